"""A read-only web dashboard over Fedsite results folders, finished or still being written.

`fedsite dashboard DIR ...` serves it on its own; `fedsite simulate --dashboard` and
`fedsite coordinator --dashboard` serve it beside a live run. Layers: `files` reads a run's files
safely (no link followed, nothing outside the given folders, only complete JSONL lines),
`runs` finds the runs and turns their files into the JSON the pages show, `app` is the Starlette
app (JSON endpoints, the static front end, access control) and `server` binds and starts it.
Nothing in coordinator/ or client/ imports this package; only the command line does.
"""

DEFAULT_ADDRESS = "127.0.0.1:8050"  # loopback: off loopback the dashboard needs TLS and a token
