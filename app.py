"""Gradio entry point (Hugging Face Spaces: app_file). `python app.py` serves on port 7860."""
import os

from medvqa.app import build

demo = build()

if __name__ == "__main__":
    # show_error: a failure no handler put in words still shows its message, not a bare "Error" badge
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), show_error=True)
