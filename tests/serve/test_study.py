"""The preference study: configs, votes (one per voter per pair), Wilson intervals, the pages, kill safety."""

import os
import re
import signal
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from stepsaver.bench.load import free_port, wait_healthy
from stepsaver.errors import StepsaverError
from stepsaver.serve import ServeSettings, create_app
from stepsaver.serve import study as st


def test_parse_config():
    assert st.parse_config("steps=auto,skip")["steps"] == "auto"
    assert st.parse_config("steps=auto,skip")["skip"] is True
    cfg = st.parse_config("model=tiny,steps=20,scheduler=euler,skip=0.02,guidance=3")
    assert cfg == {"model": "tiny", "steps": 20, "scheduler": "euler", "skip": 0.02, "guidance": 3.0}
    with pytest.raises(StepsaverError, match="unknown key"):
        st.parse_config("colour=red")
    with pytest.raises(StepsaverError, match="scheduler"):
        st.parse_config("scheduler=magic")


def test_wilson_interval():
    lo, hi = st.wilson(0, 10)
    assert lo == 0 and 0.25 < hi < 0.35
    lo, hi = st.wilson(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert st.wilson(0, 0) == (0.0, 1.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory, embedded_pipe):
    root = tmp_path_factory.mktemp("study")
    db = root / "votes.sqlite"
    sid = st.create_study(db, root / "img", "steps=4", "steps=2", ["a cat, blue background", "a red apple"],
                          per_prompt=2)
    return db, sid


def test_votes_results_and_uniqueness(study):
    db, sid = study
    con = st.connect(db)
    ps = st.pairs(con, sid)
    assert len(ps) == 4
    assert st.record_vote(con, sid, ps[0]["id"], "v1", "a", "same")
    assert not st.record_vote(con, sid, ps[0]["id"], "v1", "b", "b")  # one vote per voter per pair
    assert st.record_vote(con, sid, ps[0]["id"], "v2", "b", "b")
    with pytest.raises(StepsaverError):
        st.record_vote(con, sid, 99999, "v1", "a", "a")
    res = st.results(con, sid)
    assert res["votes"] == 2 and res["adherence"]["a_wins"]["count"] == 1 and res["quality"]["tie"]["count"] == 1
    con.execute("DELETE FROM votes")
    con.commit()


def test_pages_walk_a_voter_through_every_pair(study):
    db, sid = study
    app = create_app(ServeSettings(insecure=True, study_db=str(db)), engine=_NoEngine())
    with TestClient(app) as c:
        seen = set()
        for _ in range(4):
            page = c.get(f"/study/{sid}").text
            pair = int(re.search(r"name='pair' value='(\d+)'", page).group(1))
            left = re.search(r"name='left' value='(\w)'", page).group(1)
            token = re.search(r"name='token' value='(\w+)'", page).group(1)
            assert pair not in seen
            seen.add(pair)
            assert c.get(f"/study/{sid}/image/{pair}/a").headers["content-type"] == "image/png"
            r = c.post(f"/study/{sid}/vote", data={"pair": pair, "left": left, "adherence": "left",
                                                   "quality": "same", "token": token}, follow_redirects=False)
            assert r.status_code == 303
        assert "Thank you" in c.get(f"/study/{sid}").text
        res = c.get(f"/study/{sid}/results.json").json()
        assert res["votes"] == 4 and res["quality"]["tie"]["count"] == 4
        assert res["adherence"]["a_wins"]["count"] + res["adherence"]["b_wins"]["count"] == 4
        assert "B wins" in c.get(f"/study/{sid}/results").text
        assert c.get(f"/study/{sid}/results.png").headers["content-type"] == "image/png"
        assert c.get("/study/nope").status_code == 404
        bad = c.post(f"/study/{sid}/vote", data={"pair": 1, "left": "a", "adherence": "up", "quality": "same",
                                                 "token": "x"})
        assert bad.status_code == 422


class _NoEngine:
    """The study pages need no generation engine."""

    def start(self):
        pass

    def stop(self, drain=True, timeout=0):
        pass

    def depth(self):
        return 0

    busy = 0




def test_killing_the_server_mid_study_loses_no_vote(study, tmp_path):
    import httpx

    db, sid = study
    con = st.connect(db)
    con.execute("DELETE FROM votes")
    con.commit()
    port = free_port()
    env = {**os.environ, "STEPSAVER_STUDY_DB": str(db)}
    cmd = [sys.executable, "-m", "stepsaver.cli", "serve", "--insecure", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        with httpx.Client(base_url=base, timeout=10) as c:
            for _ in range(2):
                page = c.get(f"/study/{sid}").text
                form = {k: re.search(rf"name='{k}' value='(\w+)'", page).group(1) for k in ("pair", "left", "token")}
                r = c.post(f"/study/{sid}/vote", data={**form, "adherence": "left", "quality": "left"})
                assert r.status_code == 303  # accepted: off to the next pair
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
        proc.wait()
    assert st.results(st.connect(db), sid)["votes"] == 2


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-dev-shm-usage"]


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian chromium not installed")
def test_real_browser_votes_on_every_pair_and_sees_the_results(study, tmp_path):
    """Headless Chromium (Debian's, driven by Playwright): open the study, vote on every pair, read the results."""
    from playwright.sync_api import sync_playwright

    db, sid = study
    con = st.connect(db)
    con.execute("DELETE FROM votes")
    con.commit()
    port = free_port()
    env = {**os.environ, "STEPSAVER_STUDY_DB": str(db)}
    proc = subprocess.Popen([sys.executable, "-m", "stepsaver.cli", "serve", "--insecure", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 900, "height": 820})
            page.goto(f"{base}/study/{sid}")
            answers = ["left", "right", "same", "left"]
            for i, answer in enumerate(answers):
                assert page.locator("#progress").inner_text().endswith(f"pair {i + 1} of 4")
                # the image loads (after the page: under load it may still be on its way), 64 px wide
                page.wait_for_function("() => { const i = document.querySelector('#left'); "
                                       "return i.complete && i.naturalWidth > 0; }", timeout=60_000)
                assert page.eval_on_selector("#left", "img => img.naturalWidth") == 64
                if i == 0 and os.environ.get("STEPSAVER_SCREENSHOT_DIR"):
                    page.screenshot(path=os.path.join(os.environ["STEPSAVER_SCREENSHOT_DIR"], "study-pair.png"))
                page.check(f"#adherence-{answer}")
                page.check("#quality-same")
                page.click("#submit")
            assert "Thank you" in page.content()
            page.click("#results")
            assert page.locator("#votes").inner_text() == "4"
            assert page.locator("#quality-tie").inner_text().startswith("4 ")
            page.wait_for_function("() => { const i = document.querySelector(\"img[alt='chart']\"); "
                                   "return i.complete && i.naturalWidth > 0; }", timeout=60_000)
            if os.environ.get("STEPSAVER_SCREENSHOT_DIR"):
                page.screenshot(path=os.path.join(os.environ["STEPSAVER_SCREENSHOT_DIR"], "study-results.png"),
                                full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res = st.results(st.connect(db), sid)
    assert res["votes"] == 4 and res["adherence"]["tie"]["count"] == 1
