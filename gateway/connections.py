"""The process's connections (index, Redis, buckets), built once from Settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gateway.index.db import make_engine, make_sessionmaker, migrate
from gateway.settings import Settings
from gateway.storage import Bucket, make_bucket
from policies.rules import RulesStore


@dataclass
class Connections:
    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        engine = make_engine(self.settings.database_url)
        migrate(engine)
        return engine

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
        )

    @cached_property
    def rules(self) -> RulesStore:
        return RulesStore(self.settings.policies_dir)

    @cached_property
    def originals(self) -> Bucket:
        return make_bucket(self.settings, self.settings.originals_bucket)

    @cached_property
    def hot(self) -> Bucket:
        return make_bucket(self.settings, self.settings.hot_bucket)

    @cached_property
    def cold(self) -> Bucket:
        return make_bucket(self.settings, self.settings.cold_bucket)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()
