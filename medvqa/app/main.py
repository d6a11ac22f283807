"""Assemble the tabs into one Blocks app with a bounded queue."""
from __future__ import annotations

import gradio as gr

from medvqa.app import about, ask, features, finetune, review
from medvqa.predict import set_cpu_threads


def build() -> gr.Blocks:
    set_cpu_threads()
    with gr.Blocks(title="medvqa — medical VQA workbench") as demo:
        gr.Markdown("# medvqa · ask, compare, explain\n*Research demo — not for clinical use.*")
        ask.build_tab(demo)
        features.build_tab()
        finetune.build_tab()
        review.build_tab()
        about.build_tab()
    # Two model forwards at a time on a 2-core Space; the rest wait in the queue.
    return demo.queue(default_concurrency_limit=2, max_size=64)
