"""The parts of hubquant's Gradio Space: discovery on the Hub, model cache and side-by-side generation,
metrics, the background convert job, and the Blocks UI that ties them together (space/app.py)."""
