"""The GP's page and the EHR's JSON API (docs/gateway.md, "The GP's page and the API").

- ``auth``: password and API token hashes, sessions, CSRF, sign-in throttling;
- ``board``: the devices' status (online, outbox depth, last seen, calibration) from their
  retained status messages;
- ``captures``: a case's captures in the store, and their thumbnails;
- ``desk``: what the page and the API do (cases through the gateway's signed commands), and
  the audit of every staff action;
- ``app``: the FastAPI application (pages, API, OpenAPI at ``/openapi.json``);
- ``server``: its process under the service's supervisor, or a thread (demo, tests).
"""
