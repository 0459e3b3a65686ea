"""The human grading page: SQLite storage, and the real page end to end in headless Chromium."""

import shutil
import socket
import threading
import time

import pytest

from afmkit.errors import UserError
from afmkit.eval.sxs_ui import CHOICES, GradeStore, create_app

PAIRS = [
    {
        "key": f"p{i}",
        "prompt": f"Prompt number {i}",
        "a": f"model-A says {i}",
        "b": f"model-B says {i}",
        "model_a": "m1",
        "model_b": "m2",
    }
    for i in range(3)
]


def test_grades_are_committed_and_survive_reopening(tmp_path):
    db = tmp_path / "grades.sqlite"
    store = GradeStore(db)
    assert store.add_pairs(PAIRS) == 3 and store.add_pairs(PAIRS) == 0
    shown = store.next_pair()
    a_is_left = shown["left"].startswith("model-A")
    store.grade(shown["token"], "A much better" if a_is_left else "B much better")  # model A wins
    with pytest.raises(UserError, match="unknown choice"):
        store.grade(store.next_pair()["token"], "A best")
    with pytest.raises(UserError, match="unknown or expired"):
        store.grade("nope", "tie")
    reopened = GradeStore(db)  # a new process: the grade is on disk
    assert reopened.progress() == {"graded": 1, "total": 3}
    [grade] = reopened.grades()
    assert grade["winner"] == "a" and grade["strength"] == "much better"
    assert grade["order"] == ("ab" if a_is_left else "ba")
    report = reopened.report()
    assert report["win"]["count"] == 1 and report["grader"] == "human" and report["model_a"] == "m1"


def test_random_order_shows_model_a_on_both_sides(tmp_path):
    store = GradeStore(tmp_path / "g.sqlite")
    store.add_pairs(PAIRS[:1])
    sides = {store.next_pair()["left"].startswith("model-A") for _ in range(40)}
    assert sides == {True, False}


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a usable SQLite"):
        GradeStore(bad)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    import uvicorn

    store = GradeStore(tmp_path / "grades.sqlite")
    store.add_pairs(PAIRS)
    port = _free_port()
    config = uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", store
    instance.should_exit = True
    thread.join(timeout=10)


def _chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not binary or not shutil.which(driver):
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    return webdriver, options, Service(executable_path=driver)


def test_grading_page_end_to_end_in_headless_chromium(server, tmp_path):
    webdriver, options, service = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, store = server
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    browser = webdriver.Chrome(options=options, service=service)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(url)

        def status_is(graded):
            return wait.until(ec.text_to_be_present_in_element((By.ID, "status"), f"{graded} of 3 pairs graded"))

        status_is(0)
        buttons = browser.find_elements(By.CSS_SELECTOR, "#choices button")
        assert [b.text for b in buttons][4] == "tie" and len(buttons) == len(CHOICES)
        # Grade three pairs: model A much better, model A slightly better, tie.
        wanted = ["much better", "slightly better", None]
        for graded, strength in enumerate(wanted):
            wait.until(lambda d: d.find_element(By.ID, "left").text.strip() != "")
            left = browser.find_element(By.ID, "left").text
            right = browser.find_element(By.ID, "right").text
            prompt = browser.find_element(By.ID, "prompt").text
            key = prompt.rsplit(" ", 1)[1]
            assert {left, right} == {f"model-A says {key}", f"model-B says {key}"}
            if strength is None:
                choice = "tie"
            else:
                side = "A" if left.startswith("model-A") else "B"  # the page's A is the left response
                choice = f"{side} {strength}"
            browser.find_element(By.CSS_SELECTOR, f'#choices button[data-choice="{choice}"]').click()
            status_is(graded + 1)
        wait.until(ec.visibility_of_element_located((By.ID, "done")))

        browser.refresh()  # the grades are in SQLite, not in the page
        status_is(3)
        assert store.progress() == {"graded": 3, "total": 3}

        browser.find_element(By.ID, "show-report").click()
        wait.until(ec.presence_of_element_located((By.ID, "report-table")))
        cells = {
            row.get_attribute("data-outcome"): [c.text for c in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, "#report-table tr[data-outcome]")
        }
        assert cells["win"][1] == "66.67" and cells["win"][3] == "2"
        assert cells["tie"][1] == "33.33" and cells["lose"][3] == "0"
    finally:
        browser.quit()
    report = store.report()
    assert report["strengths"]["a"] == {"much better": 1, "better": 0, "slightly better": 1, "negligibly better": 0}


def test_cli_report_from_the_database(tmp_path, capsys):
    import json

    from afmkit.cli import main

    db = tmp_path / "g.sqlite"
    store = GradeStore(db)
    store.add_pairs(PAIRS)
    shown = store.next_pair()
    store.grade(shown["token"], "tie")
    assert main(["eval", "sxs-ui", "--db", str(db), "--report", "--json", "--out", str(tmp_path / "r")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tie"]["count"] == 1 and (tmp_path / "r" / "sxs.png").is_file()
    assert report["length"]["median_words"] == {"a": 3, "b": 3}  # the pairs' lengths, read from the database
    assert main(["eval", "sxs-ui", "--db", str(tmp_path / "empty.sqlite")]) == 2
    assert "no pairs to grade" in capsys.readouterr().err
