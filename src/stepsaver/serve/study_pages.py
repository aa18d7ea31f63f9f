"""The study's web pages: one pair at a time, two questions, then the results.

One vote per voter per pair, also for clients that drop cookies: the voter id is issued by the
server on the study page (a signed cookie) and a vote is accepted only with a valid one, and the
vote form carries a per-page token (an HMAC of study, pair, left/right order and voter), so a
vote must come from a page this voter was shown for this pair.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import uuid
from pathlib import Path

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from stepsaver.errors import StepsaverError
from stepsaver.serve import study as st

COOKIE = "stepsaver_voter"
STYLE = """body{font-family:sans-serif;max-width:760px;margin:2em auto;color:#222}
.pair{display:flex;gap:24px}.pair figure{margin:0;text-align:center}
.pair img{width:320px;height:320px;image-rendering:pixelated;border:1px solid #ccc}
fieldset{margin:1em 0}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _question(name: str, text: str) -> str:
    options = "".join(f"<label><input type='radio' name='{name}' value='{v}' id='{name}-{v}' required> {label}"
                      f"</label> " for v, label in (("left", "Left"), ("same", "Same"), ("right", "Right")))
    return f"<fieldset><legend>{html.escape(text)}</legend>{options}</fieldset>"


def study_router(db: str | Path) -> APIRouter:
    router = APIRouter(prefix="/study", tags=["study"])
    con = st.connect(db)
    secret = st.voter_secret(con)

    def sign(text: str) -> str:
        return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:32]

    def known_voter(request: Request) -> str | None:
        """The voter id of a cookie this server issued (None: no cookie, or one it never signed)."""
        cookie = request.cookies.get(COOKIE, "")
        voter, _, sig = cookie.partition(".")
        return voter if voter and sig and hmac.compare_digest(sig.encode(), sign(f"voter:{voter}").encode()) else None

    def voter_of(request: Request) -> tuple[str, bool]:
        voter = known_voter(request)
        return (voter, False) if voter else (uuid.uuid4().hex, True)

    def set_voter(resp: Response, voter: str) -> None:
        resp.set_cookie(COOKIE, f"{voter}.{sign(f'voter:{voter}')}", max_age=365 * 86400, httponly=True,
                        samesite="lax")

    def page_token(study: str, pair: int, left: str, voter: str) -> str:
        return sign(f"vote:{study}:{pair}:{left}:{voter}")

    def study_or_404(study: str) -> dict:
        try:
            return st.get_study(con, study)
        except StepsaverError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @router.get("/{study}", response_class=HTMLResponse)
    def show(study: str, request: Request) -> Response:
        info = study_or_404(study)
        voter, new = voter_of(request)
        pair = st.next_pair(con, study, voter)
        total = len(st.pairs(con, study))
        if pair is None:
            resp = _page("Thank you", f"<h1>Thank you!</h1><p>You rated all {total} pairs.</p>"
                                      f"<p><a id='results' href='/study/{study}/results'>See the results</a></p>")
        else:
            a_left = st.left_is_a(voter, pair["id"])
            left, right = ("a", "b") if a_left else ("b", "a")
            body = (f"<h1>Which is better?</h1><p id='progress'>{html.escape(info['id'])}: pair "
                    f"{total - _remaining(con, study, voter) + 1} of {total}</p>"
                    f"<p>Prompt: <b id='prompt'>{html.escape(pair['prompt'])}</b></p>"
                    f"<div class='pair'><figure><img id='left' src='/study/{study}/image/{pair['id']}/{left}' "
                    f"alt='left'><figcaption>Left</figcaption></figure><figure><img id='right' "
                    f"src='/study/{study}/image/{pair['id']}/{right}' alt='right'><figcaption>Right</figcaption>"
                    f"</figure></div><form method='post' action='/study/{study}/vote'>"
                    f"<input type='hidden' name='pair' value='{pair['id']}'>"
                    f"<input type='hidden' name='left' value='{left}'>"
                    f"<input type='hidden' name='token' value='{page_token(study, pair['id'], left, voter)}'>"
                    + _question("adherence", st.QUESTIONS["adherence"]) + _question("quality", st.QUESTIONS["quality"])
                    + "<button id='submit' type='submit'>Vote</button></form>")
            resp = _page("stepsaver study", body)
        if new:
            set_voter(resp, voter)
        return resp

    @router.post("/{study}/vote", responses={403: {"description": "no voter cookie, or a vote form not from "
                                                                   "this voter's page"}})
    def vote(study: str, request: Request, pair: int = Form(..., ge=1, le=st.MAX_ID), left: str = Form(...),
             adherence: str = Form(...), quality: str = Form(...), token: str = Form(...)) -> Response:
        study_or_404(study)
        voter = known_voter(request)
        if voter is None:
            raise HTTPException(status_code=403, detail=f"no voter cookie: open /study/{study} first (voting needs "
                                                        "cookies) and vote from that page")
        if left not in ("a", "b") or adherence not in ("left", "right", "same") or quality not in ("left", "right",
                                                                                                   "same"):
            raise HTTPException(status_code=422, detail="answers must be left, right or same")
        if not hmac.compare_digest(token.encode(), page_token(study, pair, left, voter).encode()):
            raise HTTPException(status_code=403, detail=f"this vote form was not shown to you for pair {pair}; "
                                                        f"reload /study/{study} and vote again")
        right = "b" if left == "a" else "a"

        def side(answer: str) -> str:
            return {"left": left, "right": right, "same": "same"}[answer]

        try:
            st.record_vote(con, study, pair, voter, side(adherence), side(quality))
        except StepsaverError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return RedirectResponse(f"/study/{study}", status_code=303)

    @router.get("/{study}/image/{pair}/{side}")
    def image(study: str, pair: int, side: str) -> Response:
        info = study_or_404(study)
        row = next((p for p in st.pairs(con, study) if p["id"] == pair), None)
        if row is None or side not in ("a", "b"):
            raise HTTPException(status_code=404, detail="no such image")
        return FileResponse(Path(info["root"]) / row[f"image_{side}"], media_type="image/png")

    @router.get("/{study}/results.json")
    def results_json(study: str) -> JSONResponse:
        study_or_404(study)
        return JSONResponse(st.results(con, study))

    @router.get("/{study}/results.png")
    def results_png(study: str) -> Response:
        study_or_404(study)
        return Response(st.results_plot(st.results(con, study)), media_type="image/png")

    @router.get("/{study}/results", response_class=HTMLResponse)
    def results_page(study: str) -> HTMLResponse:
        study_or_404(study)
        res = st.results(con, study)
        rows = ""
        for q in st.QUESTIONS:
            r = res[q]
            cells = "".join(f"<td id='{q}-{k}'>{r[k]['count']} ({r[k]['rate']:.0%}, 95% CI {r[k]['ci95'][0]:.0%}"
                            f"-{r[k]['ci95'][1]:.0%})</td>" for k in ("b_wins", "tie", "a_wins"))
            rows += f"<tr><td>{html.escape(r['question'])}</td>{cells}</tr>"
        body = (f"<h1>Results of study {html.escape(study)}</h1><p>A = <code>{html.escape(res['a'])}</code>, "
                f"B = <code>{html.escape(res['b'])}</code>; <span id='votes'>{res['votes']}</span> votes from "
                f"{res['voters']} voters on {res['pairs']} pairs.</p><table><tr><th>question</th><th>B wins</th>"
                f"<th>same</th><th>A wins</th></tr>{rows}</table>"
                f"<p><img src='/study/{study}/results.png' alt='chart'></p>")
        return _page("study results", body)

    return router


def _remaining(con, study: str, voter: str) -> int:
    voted = {r[0] for r in con.execute("SELECT pair FROM votes WHERE study = ? AND voter = ?", (study, voter))}
    return len([p for p in st.pairs(con, study) if p["id"] not in voted])
