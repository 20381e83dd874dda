"""The web dashboard (`ablauf ui`): runs, a run drawn live, and the actions on runs.

`app.create_app` builds the Starlette application, `serve.serve` runs it with uvicorn on
a loopback address (another one only when asked), `live` streams changes as server-sent
events. Everything reaches the runs through `ablauf_lang.api`.
"""
