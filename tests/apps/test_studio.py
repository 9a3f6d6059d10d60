"""The studio, served for real: gradio_client calls, concurrent requests, bad input, and a headless browser."""
import importlib.util
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CKPT = str(REPO / "checkpoints" / "shapes")
PROMPT = "a large red circle at the top left on a black background"
ARTIFACTS = REPO / "outputs" / "test-artifacts"


def _load_studio():
    spec = importlib.util.spec_from_file_location("studio_under_test", REPO / "apps" / "studio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    studio = _load_studio()
    app = studio.build_app([CKPT])
    _, url, _ = studio.launch(app, port=_free_port(), block=False)
    yield studio, url.rstrip("/")
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def _as_array(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_binds_localhost_and_honours_environment(server, monkeypatch):
    studio, url = server
    assert url.startswith("http://127.0.0.1:")
    seen = {}

    class FakeApp:  # launch() only reads host/port here; the real server is exercised by the other tests
        def launch(self, **kw):
            seen.update(kw)

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    studio.launch(FakeApp(), block=False)
    assert (seen["server_name"], seen["server_port"], seen["share"]) == ("0.0.0.0", 7999, False)
    studio.launch(FakeApp(), host="127.0.0.1", port=7001, block=False)
    assert (seen["server_name"], seen["server_port"]) == ("127.0.0.1", 7001)


def test_generate_image_api_returns_the_pipelines_image(client):
    image, gallery, record = client.predict(PROMPT, 3, api_name="/generate_image")
    got = _as_array(image)
    assert got.shape == (64, 64, 3)
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    want = TextToImagePipeline.from_pretrained(CKPT)(PROMPT, generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(got, np.asarray(want))  # same seed, same image as the API and the CLI
    assert len(gallery) == 1 and record["seed"] == 3 and record["forward_passes"] > 0
    assert record["tokens"] == 256 and record["tokens_per_s"] > 0
    assert record["unread_words"] == []


def test_words_the_encoder_cannot_read_are_named_in_the_record(client):
    _, _, record = client.predict("a large red \U0001F7E5 circle at the top left on a black background", 3,
                                  api_name="/generate_image")
    assert record["unread_words"] == ["\U0001F7E5"]


def test_ten_requests_at_once_all_succeed(server):
    url = server[1]

    def one(seed):
        return Client(url, verbose=False).predict(PROMPT, seed, api_name="/generate_image")

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert len(results) == 10
    for image, _, record in results:
        assert _as_array(image).shape == (64, 64, 3)
    assert sorted(r[2]["seed"] for r in results) == list(range(10))


@pytest.mark.parametrize("args, message", [
    (("", 0), "prompt is empty"),
    (("x" * 1000, 0), "at most"),
    ((PROMPT, -5), "seed|minimum"),
    ((PROMPT, 0, CKPT, 10_000), "number of images|maximum"),
    ((PROMPT, 0, CKPT, 1, 1e9), "guidance|maximum"),
    ((PROMPT, 0, CKPT, 1, 3.0, -1.0), "temperature|minimum"),
    ((PROMPT, 0, "/no/such/checkpoint"), "not one of this studio's checkpoints|not in the list of choices"),
    ((PROMPT, 0, CKPT, 1, 1.5, 1.0, 1, 1.0, "constant", "diffusion"), "choices|sampler"),
    ((PROMPT, 0, CKPT, 1, 1.5, 1.0, 1, 1.0, "constant", "AR", 0, "4/2", 0.0, 0.0, 99), "candidates|maximum"),
])
def test_bad_input_is_a_message_and_the_server_keeps_serving(client, args, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate_image")
    image, _, _ = client.predict(PROMPT, 0, api_name="/generate_image")
    assert _as_array(image).shape == (64, 64, 3)


def test_distilled_decoding_from_the_studio(server, client):
    studio = server[0]
    if studio.Studio([CKPT]).pipeline(CKPT).student is None:
        pytest.skip("the shipped checkpoint has no Distilled Decoding student")
    for choice, passes in (("DD 1 step", 1), ("DD 2 steps", 2)):
        image, gallery, record = client.predict(PROMPT, 0, CKPT, 2, 2.0, 0.7, 5, 1.0, "constant", choice,
                                                api_name="/generate_image")
        assert _as_array(image).shape == (64, 64, 3) and len(gallery) == 2
        assert record["forward_passes"] == passes * record["candidates"] and record["sampler"] == f"dd{passes}"


def test_compare_runs_two_settings_side_by_side(client):
    base = [CKPT, 1, 1.5, 1.0, 1, 1.0, "constant", "AR", 0, "4/2", 0.0, 0.0, 1]
    other = [CKPT, 2, 3.0, 1.0, 0, 1.0, "linear", "AR", 0.95, "4/2", 0.1, 0.2, 3]
    ga, ra, gb, rb = client.predict(PROMPT, 4, *base, *other, api_name="/compare")
    assert len(ga) == 1 and len(gb) == 2
    assert ra["candidates"] == 1 and ra["judge_scores"] is None
    assert rb["candidates"] == 3 and len(rb["judge_scores"]) == 2
    assert ra["option_guidance_scale"] == 1.5 and rb["option_cfg_schedule"] == "linear"
    assert ra["zipvl"] is None and rb["zipvl"]["tau"] == 0.95
    assert ra["option_min_p"] == 0.0 and rb["option_min_p"] == 0.1 and rb["option_plausibility"] == 0.2


def test_zipvl_from_the_studio_reports_kept_ratio_and_kv_bytes(client):
    image, _, record = client.predict(PROMPT, 0, CKPT, 1, 2.0, 0.7, 5, 1.0, "constant", "AR", 0.9, "4/2",
                                      api_name="/generate_image")
    assert _as_array(image).shape == (64, 64, 3)
    z = record["zipvl"]
    assert z["tau"] == 0.9 and z["kv_bits"] == "4/2" and len(z["kept_ratio_per_layer"]) > 0
    assert 0 < z["kv_bytes"] < z["dense_kv_bytes"]
    with pytest.raises(Exception, match="ZipVL|3/1"):
        client.predict(PROMPT, 0, CKPT, 1, 2.0, 0.7, 5, 1.0, "constant", "AR", 0.9, "3/1", api_name="/generate_image")


def _chromium() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser")), shutil.which("chromedriver")


def test_browser_types_a_prompt_and_gets_an_image(server):
    browser, driver_path = _chromium()
    if not (browser and driver_path):
        if os.environ.get("MMGEN_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (make setup installs them)")
        pytest.skip("chromium / chromedriver not installed (make setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--no-first-run",
              "--window-size=1400,1800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(server[1])
        wait = WebDriverWait(driver, 60)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys(PROMPT)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#result img")))
        wait.until(lambda d: img.get_attribute("src") and img.get_attribute("naturalWidth") not in (None, "0"))
        assert int(img.get_attribute("naturalWidth")) == 64
        driver.save_screenshot(str(ARTIFACTS / "studio_generate.png"))
        # bad input shows a message in the page, and the page keeps working
        box.send_keys(Keys.CONTROL, "a")  # clear() would not fire the input event the page listens to
        box.send_keys(Keys.DELETE)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "prompt is empty" in d.page_source)
        driver.save_screenshot(str(ARTIFACTS / "studio_error.png"))
        box.send_keys("a small blue square in the center on a white background")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()  # the page still works after the error
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#result img").get_attribute("naturalWidth") == "64")
    finally:
        driver.quit()
    assert (ARTIFACTS / "studio_generate.png").stat().st_size > 1000


def test_only_the_studios_checkpoints_load_unless_allowed(tmp_path):
    from mmgen.tokenizers.base import CheckpointError

    studio = _load_studio()
    closed = studio.Studio([CKPT])
    with pytest.raises(CheckpointError, match="not one of"):
        closed.pipeline(str(tmp_path))
    assert closed.pipeline(CKPT) is closed.pipeline(CKPT + "/")  # loaded once, cached
    opened = studio.Studio([CKPT], allow_custom=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        opened.pipeline(str(tmp_path / "missing"))
    assert "Checkpoint problem" in opened.describe(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def seeing_checkpoint(tmp_path_factory, text_encoder):
    """A debug SEED checkpoint whose model is marked to draw and see (untrained: its captions are bytes,
    but the served caption must be exactly the pipeline's)."""
    from mmgen.pipelines.text_to_image import TextToImagePipeline
    from tests.conftest import make_debug_model
    from tests.tokenizers.test_seed import debug_seed

    tok = debug_seed(with_decoder=True)
    path = tmp_path_factory.mktemp("seeing") / "seed-debug"
    TextToImagePipeline(tok, make_debug_model(tok.vocab_size), text_encoder,
                        tasks=["draw", "see"]).save_pretrained(path, dtype=None)
    return str(path)


def test_caption_tab_returns_the_pipelines_caption(seeing_checkpoint, tmp_path):
    from gradio_client import handle_file

    from mmgen.pipelines.image_to_text import ImageToTextPipeline
    from mmgen.worlds import shapes

    studio = _load_studio()
    app = studio.build_app([CKPT, seeing_checkpoint])
    _, url, _ = studio.launch(app, port=_free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        sample = next(shapes.generate(1, seed=77, num_objects=1))
        path = tmp_path / "scene.png"
        sample.image.save(path)
        got = client.predict(handle_file(str(path)), seeing_checkpoint, api_name="/caption_image")
        want = ImageToTextPipeline.from_pretrained(seeing_checkpoint)([sample.image]).captions[0]
        assert got == want
        with pytest.raises(Exception, match="upload an image"):
            client.predict(None, seeing_checkpoint, api_name="/caption_image")
        with pytest.raises(gr.Error, match="not trained to write captions"):  # a draw-only checkpoint
            studio.Studio([CKPT]).caption(sample.image, CKPT)
    finally:
        app.close()
