"""create_app: the WSGI application, with every blueprint under /dicomweb and /api."""

from __future__ import annotations

from flask import Flask

from gateway import (
    api,
    cors,
    delete,
    frames,
    health,
    http,
    metadata,
    qido,
    rendered,
    storage_api,
    stow,
    tiers,
    wado,
)
from gateway.connections import Connections
from gateway.logs import configure as configure_logs
from gateway.settings import Settings


def create_app(settings: Settings | None = None, connections: Connections | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logs(settings)
    app = Flask("gateway")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["gateway"] = connections or Connections(settings)
    rules = app.extensions["gateway"].rules
    rules.versions, rules.access  # noqa: B018 - a bad rules file stops the start, not every request
    tiers.lifecycle_rules(app.extensions["gateway"])
    http.install_error_handlers(app)
    cors.install(app, settings.cors_origins)
    for module in (stow, qido, wado, frames, metadata, rendered, delete):
        app.register_blueprint(module.blueprint, url_prefix=http.DICOMWEB)
    app.register_blueprint(api.blueprint, url_prefix="/api")
    app.register_blueprint(wado.api_blueprint, url_prefix="/api")
    app.register_blueprint(storage_api.blueprint, url_prefix="/api")
    app.register_blueprint(health.blueprint)
    health.install_request_metrics(app)
    return app
