"""``peft-persona demo``: the reply, switch, strength and facts functions on a tiny model, the command's errors, and
the Gradio app driven in headless Chromium with Selenium.

The browser test skips only when no Chromium and chromedriver binaries are found. With ``PEFT_PERSONA_SCREENSHOTS=DIR``
it runs on the embedded SmolLM2-135M-Instruct with the README main command's adapters (extracted in-process) and saves
``DIR/demo-*.png``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import peft_persona as pp
from conftest import tiny_llama, tiny_tokenizer, word_texts
from peft_persona import cli, demo, models
from peft_persona.commands import demo as demo_command

PROMPT = "w10 w20 w30"
MAX_NEW_TOKENS = 12
SCREENSHOTS = os.environ.get("PEFT_PERSONA_SCREENSHOTS")


def save_pair(model: torch.nn.Module, tokenizer, out: Path, sparsity: float, strength: float, **sources) -> Path:
    """The README main command's layout: ``out/extravert`` and ``out/introvert``, contrastive masks."""
    peft_model = pp.PersonaExtractor(model, tokenizer).extract(
        sources, method="contrastive", sparsity=sparsity, strength=strength
    )
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    """A contrastive extravert/introvert pair of the tiny Llama, sparsity 0.5 at strength 1, as ``masks/``."""
    texts = {"extravert": word_texts(1, 16), "introvert": word_texts(2, 16)}
    return save_pair(tiny_llama(), tiny_tokenizer(), tmp_path_factory.mktemp("demo") / "masks", 0.5, 1.0, **texts)


@pytest.fixture
def loaded(masks):
    """``(peft_model, tokenizer, configs)``: a fresh tiny Llama with both adapters of ``masks``, extravert active."""
    peft_model, configs = demo.load_adapters(tiny_llama(), demo.find_adapters([masks]))
    return peft_model, tiny_tokenizer(), configs


def test_adapters_are_found_in_the_main_command_layout(masks, loaded):
    assert list(demo.find_adapters([masks])) == ["extravert", "introvert"]
    peft_model, _, configs = loaded
    assert demo.active_persona(peft_model) == "extravert" and list(configs) == ["extravert", "introvert"]


def test_switching_persona_changes_the_reply_and_base_is_the_bare_model(loaded):
    peft_model, tokenizer, _ = loaded
    base, extravert = demo.replies(peft_model, tokenizer, PROMPT, MAX_NEW_TOKENS)
    assert base == demo.generate_reply(tiny_llama(), tokenizer, PROMPT, MAX_NEW_TOKENS)  # no adapter at all
    assert demo.switch_persona(peft_model, "introvert") == "introvert"
    assert demo.active_persona(peft_model) == "introvert"
    again, introvert = demo.replies(peft_model, tokenizer, PROMPT, MAX_NEW_TOKENS)
    assert again == base
    assert len({base, extravert, introvert}) == 3, (base, extravert, introvert)
    assert len(extravert.split()) == MAX_NEW_TOKENS
    with pytest.raises(KeyError, match="no adapter 'nobody'; loaded: \\['extravert', 'introvert'\\]"):
        demo.switch_persona(peft_model, "nobody")


def test_strength_zero_gives_the_base_reply_exactly_and_one_restores_the_persona(loaded):
    peft_model, tokenizer, _ = loaded
    base, extravert = demo.replies(peft_model, tokenizer, PROMPT, MAX_NEW_TOKENS)
    tokens = torch.tensor([[10, 20, 30, 40]])
    assert demo.apply_strength(peft_model, "extravert", 0.0) == 0.0
    assert demo.generate_reply(peft_model, tokenizer, PROMPT, MAX_NEW_TOKENS) == base
    with torch.no_grad():
        assert torch.equal(peft_model(tokens).logits, tiny_llama()(tokens).logits)
    assert peft_model.peft_config["extravert"].strength == 0.0
    assert demo.apply_strength(peft_model, "extravert", 1.0) == 1.0
    assert demo.generate_reply(peft_model, tokenizer, PROMPT, MAX_NEW_TOKENS) == extravert
    with pytest.raises(ValueError, match="strength"):
        demo.apply_strength(peft_model, "extravert", 1.5)


def test_facts_show_method_sparsity_strength_and_calibration_size(loaded):
    _, _, configs = loaded
    facts = demo.adapter_facts("introvert", configs["introvert"])
    for row in (
        "| persona | `introvert` |",
        "| opposite persona | `extravert` |",
        "| method | `contrastive` |",
        "| sparsity | `0.5` |",
        "| saved strength | `1.0` |",
        "| save format | `bits` |",
    ):
        assert row in facts, facts
    n_tokens = configs["introvert"]["calibration"]["n_tokens"]
    assert f"| calibration | `16 texts, {n_tokens} tokens` |" in facts
    assert "| method | `unrecorded` |" in demo.adapter_facts("x", {"peft_type": "PERSONA_MASK"})
    hostile = demo.adapter_facts("x", {"persona": "a | b`c\n| method | fake |"})  # a downloaded config's text
    assert "| persona | `a \\| b'c \\| method \\| fake \\|` |" in hostile and len(hostile.splitlines()) == 10


def test_session_switch_and_strength_return_what_the_page_shows(loaded):
    session = demo.DemoSession(*loaded, max_new_tokens=MAX_NEW_TOKENS)
    base, extravert = session.ask(PROMPT)
    assert session.ask("  ") == ("", "")
    name, facts, strength, reply = session.switch("introvert", PROMPT)
    assert (name, strength) == ("introvert", 1.0) and "`introvert`" in facts and reply not in (base, extravert)
    assert session.strength(0.0, PROMPT) == base
    assert session.model.peft_config["introvert"].strength == 0.0
    assert session.model.peft_config["extravert"].strength == 1.0
    assert session.switch("extravert", PROMPT)[3] == extravert


def test_a_name_in_two_adapter_folders_is_refused(masks, tmp_path):
    shutil.copytree(masks / "introvert", tmp_path / "other" / "introvert")
    with pytest.raises(ValueError, match="two adapters are named 'introvert'"):
        demo.find_adapters([masks, tmp_path / "other"])


# ------------------------------------------------------------------------------------------------ the command
def error_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("peft-persona demo: error: "), err
    return err


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_missing_adapters_folder_names_it_and_the_command_that_makes_it(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_line(capsys, ["demo"])
    assert "--adapters masks: no such folder; make it with `peft-persona extract --persona extravert=" in err
    assert err.endswith(f"make it with `{demo_command.MAIN_COMMAND.format(out='masks')}`"), err
    err = error_line(capsys, ["demo", "--adapters", str(tmp_path / "elsewhere")])
    assert f"--out {tmp_path / 'elsewhere'}`" in err
    (tmp_path / "empty").mkdir()
    err = error_line(capsys, ["demo", "--adapters", "empty"])
    assert "--adapters empty: no adapter_config.json in empty or in any folder directly below it" in err


def test_the_named_command_is_the_readme_main_command():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    main = readme.split("<!-- main-command -->")[1].split("<!-- /main-command -->")[0]
    assert demo_command.MAIN_COMMAND.format(out="masks") in main


def test_bad_numbers_are_named_before_loading(masks, capsys, no_model):
    assert "--max-new-tokens 0: must be positive" in error_line(
        capsys, ["demo", "--adapters", str(masks), "--max-new-tokens", "0"]
    )
    assert "--port 70000" in error_line(capsys, ["demo", "--adapters", str(masks), "--port", "70000"])


def test_missing_gradio_names_the_extra_to_install(masks, model_dir, capsys, no_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    err = error_line(capsys, ["demo", "--model", str(model_dir), "--adapters", str(masks)])
    assert err.endswith('gradio is not installed; install it with `pip install "peft-persona[demo]"`'), err


def test_the_command_loads_model_and_adapters_and_serves_locally(masks, model_dir, capsys, monkeypatch):
    import gradio as gr  # the [test] extra installs it

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)  # restored after the test

    launched = {}

    def launch(app, **kwargs):
        launched.update(kwargs, analytics=app.analytics_enabled)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    argv = ["demo", "--model", str(model_dir), "--adapters", str(masks), "--port", "7999", "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    assert {k: launched[k] for k in ("server_name", "server_port", "share")} == {
        "server_name": "127.0.0.1",
        "server_port": 7999,
        "share": False,
    }
    assert "extravert, introvert" in capsys.readouterr().out
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and launched["analytics"] is False


# ------------------------------------------------------------------------------------------------ in a browser
def browser_binaries() -> tuple[str | None, str | None]:
    browser = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    return browser, shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_model_session(tmp_path: Path) -> tuple[demo.DemoSession, str]:
    """The embedded SmolLM2 with the adapters of the README's main command, and a prompt, for screenshots."""
    model, tokenizer = models.load_model()
    sources = {"extravert": "builtin:extraversion#yes", "introvert": "builtin:extraversion#no"}
    save_pair(model, tokenizer, tmp_path / "masks", 0.2, 0.5, **sources)
    base, _ = models.load_model()
    peft_model, configs = demo.load_adapters(base, demo.find_adapters([tmp_path / "masks"]))
    prompt = "Do you prefer big parties or quiet evenings at home? Answer in one sentence."
    return demo.DemoSession(peft_model, tokenizer, configs, max_new_tokens=40), prompt


class Page:
    """The demo page in a Selenium driver: read a component's value, wait for one."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def element(self, key: str, css: str = "textarea"):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, f"#{demo.ELEMENT_IDS[key]} {css}")

    def value(self, key: str) -> str | None:
        """The text in component ``key``'s box, or ``None`` while the page has not drawn it."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        try:
            return self.element(key).get_property("value")
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                shown = {k: self.value(k) for k in ("base", "persona", "active")}
                raise AssertionError(f"timed out waiting for {what}; the page shows {shown}")
            time.sleep(0.2)

    def shot(self, name: str) -> None:
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(Path(SCREENSHOTS) / f"demo-{name}.png"))


def chrome(browser: str, driver_path: str):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1150"):
        options.add_argument(argument)
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")  # nothing beyond this machine
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def test_the_app_in_a_headless_browser(loaded, tmp_path, monkeypatch):
    browser, driver_path = browser_binaries()
    if browser is None or driver_path is None:
        pytest.skip(
            f"no Chromium and chromedriver on PATH (found {browser}, {driver_path}); "
            "apt-get install chromium chromium-driver"
        )
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, if it runs at all, downloads nothing
    torch.set_num_threads(1)
    if SCREENSHOTS:
        session, prompt = real_model_session(tmp_path)
    else:
        session, prompt = demo.DemoSession(*loaded, max_new_tokens=MAX_NEW_TOKENS), PROMPT
    base, extravert = session.ask(prompt)  # what the page must show, from the same functions
    expected = dict(base=base, extravert=extravert, strength=session.model.peft_config["extravert"].strength)
    expected.update(
        introvert=session.switch("introvert", prompt)[3], introvert_strength=session.switch("introvert", "")[2]
    )
    session.switch("extravert", "")
    assert len({base, extravert, expected["introvert"]}) == 3, expected
    app = demo.build_app(session)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    driver = None
    try:
        driver = chrome(browser, driver_path)
        drive_the_page(Page(driver), f"http://127.0.0.1:{port}/", prompt, expected)
    finally:
        if driver is not None:
            driver.quit()
        app.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def drive_the_page(page: Page, url: str, prompt: str, expected: dict) -> None:
    """Ask, lower the extravert's strength to 0 on the slider's number box, switch to the introvert; check each."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, ids = expected["base"], demo.ELEMENT_IDS
    page.driver.get(url)
    page.wait("the page", lambda: page.value("active") == "extravert")
    assert float(page.element("strength", "input[type=number]").get_property("value")) == expected["strength"]
    page.element("prompt").send_keys(prompt)
    page.driver.find_element(By.ID, ids["submit"]).click()
    page.wait("both replies", lambda: page.value("base") == base and page.value("persona") == expected["extravert"])
    page.shot("replies")
    number = page.element("strength", "input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("0", Keys.ENTER)
    page.wait("the strength-0 reply", lambda: page.value("persona") == base)
    assert page.value("base") == base
    page.driver.find_element(By.CSS_SELECTOR, f"#{ids['picker']} input[value=introvert]").click()
    page.wait(
        "the introvert", lambda: page.value("active") == "introvert" and page.value("persona") == expected["introvert"]
    )
    number = page.element("strength", "input[type=number]")
    assert float(number.get_property("value")) == expected["introvert_strength"]
    facts = page.driver.find_element(By.ID, ids["facts"]).text
    assert "introvert" in facts and "contrastive" in facts, facts
    page.shot("introvert")
