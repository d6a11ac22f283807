"""Text a user types (question, comment, reviewer name) reaches the page as text, never as HTML:
every Markdown the Ask and Review tabs build is rendered here with raw HTML allowed (stricter than
Gradio's sanitiser) and must hold no tag from the payload."""
import shutil

import numpy as np
import pytest
from markdown_it import MarkdownIt
from PIL import Image

from tests.helpers import tiny_checkpoint

PAYLOAD = "<img src=x onerror=alert(1)>"
SHOWN = "&lt;img src=x onerror=alert(1)&gt;"      # what the rendered page must hold instead


@pytest.fixture
def tiny_app(tmp_path, monkeypatch):
    cks = tmp_path / "checkpoints"
    cks.mkdir()
    for model in ("cmi-mtl", "baseline"):
        shutil.copytree(tiny_checkpoint(tmp_path / model, model), cks / f"{model}-vqa-rad")
    monkeypatch.setenv("MEDVQA_CHECKPOINTS", str(cks))
    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path / "user-data"))
    monkeypatch.setenv("MEDVQA_DATA_ROOT", str(tmp_path / "no-datasets"))
    image = tmp_path / "x.png"
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(image)
    return image


def _markdowns(outputs) -> list[str]:
    """The strings among a handler's outputs (gr.update dicts or plain values)."""
    vals = [o.get("value") if isinstance(o, dict) else o for o in outputs]
    return [v for v in vals if isinstance(v, str)]


def _assert_escaped(md: str):
    html = MarkdownIt("commonmark", {"html": True}).render(md)
    assert "<img" not in html, md
    return SHOWN in html


def test_question_comment_and_reviewer_are_shown_escaped(tiny_app):
    from medvqa.app.ask import OWN_METHOD, run_ask
    from medvqa.app.review import show, summary_markdown
    from medvqa.review import ReviewStore

    shown = [_assert_escaped(md) for md in _markdowns(run_ask(str(tiny_app), PAYLOAD, "vqa-rad", OWN_METHOD, 0.5, PAYLOAD))]
    assert any(shown)                                              # the ground truth line names it, escaped

    case = {"qid": "q1", "image": str(tiny_app), "question": PAYLOAD, "ground_truth": PAYLOAD}
    store = ReviewStore()
    for reviewer in (PAYLOAD, "Dr B"):
        store.record(reviewer, "examples", "q1", "baseline-vqa-rad", "agree", question=PAYLOAD, comment=PAYLOAD)
    outs = show([case], 0, "vqa-rad", PAYLOAD, "examples")
    assert outs[2] == PAYLOAD                                      # the question Textbox holds it as plain text
    md = _markdowns(outs[:1] + outs[3:])
    assert sum(_assert_escaped(m) for m in md) == 2                # reviewer name in the position line, ground truth
    assert _assert_escaped(summary_markdown(store.summary()))      # reviewer names in Cohen's κ line
    assert store.rows()[0]["comment"] == PAYLOAD                   # stored and exported as typed
