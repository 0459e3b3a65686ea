"""The OpenAI-compatible HTTP API, one concern per module (``afmkit.infer.server`` assembles it):

* ``state.py``: ``ServerState`` (the model, scheduler, adapter registry, limits, metrics) that
  every route reads from ``request.app.state.server``, and ``ServerLimits``.
* ``errors.py``: ``ApiError`` and the OpenAI error shape; the guard middleware (API key, body
  size, and a last resort that turns any unexpected exception into a JSON 500).
* ``validation.py``: the one request-validation layer of both generation endpoints: the JSON
  body, messages/prompt, sampling fields, ``stream``/``stream_options``. Everything is checked
  here, before a job reaches the scheduler.
* ``streaming.py``: running a validated request: submit, then one JSON response or server-sent
  events; a client that goes away cancels its job in both modes.
* ``routes.py``: the endpoints.
* ``metrics.py``: counters and the Prometheus text of ``/metrics``.

Adding a route: a function in ``routes.py``. Adding a sampling field: its range check in
``SamplingParams`` (``infer/sampling.py``, which the engine and the API share), its reading from
the JSON body in ``validation.sampling_params``.
"""
