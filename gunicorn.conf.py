"""gunicorn settings for the web process (the Procfile passes `-c gunicorn.conf.py`).

Slack sends one small POST to /slack/events: tight limits on the request line and
headers, and short timeouts, so a slow or hostile client holds a worker thread only
briefly. The body limit is the app's (bot.web.MAX_BODY_BYTES). In production run
this behind a proxy that buffers whole requests (README, Deploying).
"""

limit_request_line = 2048  # "POST /slack/events HTTP/1.1" and nothing long
limit_request_fields = 50  # Slack sends about 15 headers; proxies add a few
limit_request_field_size = 4096
timeout = 30  # a worker silent this long is restarted
graceful_timeout = 10
keepalive = 5  # idle keep-alive connections; a buffering proxy reuses its own
