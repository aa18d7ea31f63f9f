"""The preference study: configs, votes (one per voter per pair), Wilson intervals, the pages, kill safety."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

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
            assert pair not in seen
            seen.add(pair)
            assert c.get(f"/study/{sid}/image/{pair}/a").headers["content-type"] == "image/png"
            r = c.post(f"/study/{sid}/vote", data={"pair": pair, "left": left, "adherence": "left",
                                                   "quality": "same"}, follow_redirects=False)
            assert r.status_code == 303
        assert "Thank you" in c.get(f"/study/{sid}").text
        res = c.get(f"/study/{sid}/results.json").json()
        assert res["votes"] == 4 and res["quality"]["tie"]["count"] == 4
        assert res["adherence"]["a_wins"]["count"] + res["adherence"]["b_wins"]["count"] == 4
        assert "B wins" in c.get(f"/study/{sid}/results").text
        assert c.get(f"/study/{sid}/results.png").headers["content-type"] == "image/png"
        assert c.get("/study/nope").status_code == 404
        bad = c.post(f"/study/{sid}/vote", data={"pair": 1, "left": "a", "adherence": "up", "quality": "same"})
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killing_the_server_mid_study_loses_no_vote(study, tmp_path):
    import httpx

    db, sid = study
    con = st.connect(db)
    con.execute("DELETE FROM votes")
    con.commit()
    port = _free_port()
    env = {**os.environ, "STEPSAVER_STUDY_DB": str(db)}
    cmd = [sys.executable, "-m", "stepsaver.cli", "serve", "--insecure", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=10) as c:
            for _ in range(2):
                page = c.get(f"/study/{sid}").text
                pair = int(re.search(r"name='pair' value='(\d+)'", page).group(1))
                c.post(f"/study/{sid}/vote", data={"pair": pair, "left": "a", "adherence": "left", "quality": "left"})
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
        proc.wait()
    assert st.results(st.connect(db), sid)["votes"] == 2
