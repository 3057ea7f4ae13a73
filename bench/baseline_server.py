"""A bare twisted.web server answering the same JSON as gatewayd: the baseline for ratios.

    python bench/baseline_server.py PORT
GET /health -> {"status":"ok","timestamp":…}; POST /api/chat -> a chat-shaped JSON body.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Health(Resource):
    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"application/json")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return json.dumps({"status": "ok", "timestamp": stamp}).encode()


class Chat(Resource):
    isLeaf = True

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        body = json.loads(request.content.read())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"session_id": "ses_0", "run_id": "run_0", "status": "completed",
             "response": body["message"], "tools_used": [],
             "tokens": {"input": 1, "output": 1}, "cost_cents": 0.0}
        ).encode()


root = Resource()
api = Resource()
root.putChild(b"health", Health())
root.putChild(b"api", api)
api.putChild(b"chat", Chat())
reactor.listenTCP(int(sys.argv[1]), Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
reactor.run()  # type: ignore[attr-defined]
