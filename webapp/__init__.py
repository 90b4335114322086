"""The web app behind `python app.py`: shipped configs, uploads, a run queue and the Gradio page.

Every run is `python train.py --config <shipped config> key=value ...` in a subprocess, so the app
trains exactly as the command line does. Only webapp/ui.py imports gradio.
"""
