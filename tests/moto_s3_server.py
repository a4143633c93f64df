"""moto's S3 server for the tests, with S3's conditional writes made atomic.

moto 5.2.5 checks a conditional PUT's ``If-Match`` / ``If-None-Match`` and then writes, with
no lock between the two (``moto/s3/responses.py``, ``put_object``), on a threaded server: two
concurrent ``If-Match`` PUTs can both pass the check. S3 never lets both succeed ("If
multiple conditional writes occur for the same object name, the first write operation to
finish succeeds": AWS S3 User Guide, "Conditional writes"). On a 2-core AVX2 machine the lease
race of tests/test_s3.py saw two runs take one expired lease through plain moto. Here every
request that carries a condition runs under one lock (the rest stay concurrent), so the store
the tests run against keeps S3's guarantee and a double winner is the lease's fault alone.

Usage: ``python -m tests.moto_s3_server HOST PORT``.
"""

from __future__ import annotations

import os
import sys
import threading


def atomic_conditional_requests(app):
    """WSGI middleware: requests with If-Match or If-None-Match run one at a time, their
    response built whole under the lock."""
    lock = threading.Lock()

    def wrapped(environ, start_response):
        if "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ:
            with lock:
                return list(app(environ, start_response))
        return app(environ, start_response)
    return wrapped


def main(argv: list[str]) -> None:
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import run_simple

    host, port = argv[0], int(argv[1])
    os.environ.setdefault("MOTO_PORT", str(port))  # as moto_server sets it
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # as moto_server runs it
    run_simple(host, port, atomic_conditional_requests(app), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1:])
