"""The Gradio demo: upload or draw a condition, type a prompt, pick an adapter, generate.
`python demo.py [--host 127.0.0.1] [--port 7860] [--adapters DIR ...] [--base MODEL] [--share false]`
(see src/orthodiff/app/demo.py)."""

import sys


def main(argv: list[str]):
    try:
        from orthodiff.app.demo import main as demo_main
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in ("gradio", "gradio_client"):
            raise SystemExit("demo.py needs gradio: pip install -e '.[dev]' (or pip install gradio)") from None
        raise
    demo_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
