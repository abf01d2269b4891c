#!/usr/bin/env python3
"""Verifies one request with the Standard Webhooks reference library (the `standardwebhooks`
package from PyPI), as a partner's receiver would.

    verify_standard_webhooks.py SECRET < request.json

request.json: {"headers": {"webhook-id": ..., "webhook-timestamp": ..., "webhook-signature": ...},
"body_base64": "..."}. Prints "ok" and exits 0 when the request verifies with SECRET; prints the
library's error and exits 1 otherwise. Exits 3 when the library is not installed
(scripts/test.sh installs it).
"""
import base64
import json
import sys

try:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
except ImportError as e:
    print(f"standardwebhooks is not installed: {e}")
    sys.exit(3)

request = json.load(sys.stdin)
body = base64.b64decode(request["body_base64"])
try:
    Webhook(sys.argv[1]).verify(body, request["headers"], json_parse=False)
except WebhookVerificationError as e:
    print(f"rejected: {e}")
    sys.exit(1)
print("ok")
