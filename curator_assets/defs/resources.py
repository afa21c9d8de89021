"""The storage resource: a dataset URL plus credentials, turned into a core ``Dataset``."""

import os
from typing import Any

import dagster as dg
from pydantic import Field

from curator_assets.store.dataset import Dataset
from curator_assets.store.fs import url_protocol

# Credentials come from these environment variables (through dg.EnvVar, so the UI shows the
# variable's name, never its value).
SECRET_ENV = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "gcs_token": "GCS_TOKEN",
    "azure_connection_string": "AZURE_STORAGE_CONNECTION_STRING",
    "azure_account_key": "AZURE_STORAGE_KEY",
}


class ShardStorage(dg.ConfigurableResource):
    """Where the shards are (local path, file://, s3://, gs://, az://, abfs://) and how to reach them."""

    dataset_url: str = Field(description="Folder of tar shards (or one shard file).")
    index_url: str | None = Field(default=None, description="Separate folder for .idx files (read-only datasets).")
    output_url: str | None = Field(
        default=None, description="Folder for reports and manifests (default: <index or dataset>/_curator)."
    )
    endpoint_url: str | None = Field(default=None, description="S3/GCS endpoint, e.g. a local emulator.")
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    gcs_token: str | None = Field(default=None, description="gcsfs token: 'anon', 'google_default' or a JSON key path.")
    azure_connection_string: str | None = None
    azure_account_name: str | None = None
    azure_account_key: str | None = None
    anon: bool = False
    extra_options: dict[str, Any] = Field(default_factory=dict, description="More fsspec storage options (no secrets).")

    def storage_options(self) -> dict[str, Any]:
        protocol = url_protocol(_plain(self.dataset_url))
        opts: dict[str, Any] = dict(self.extra_options)
        if protocol in ("s3", "s3a"):
            _put(opts, key=self.aws_access_key_id, secret=self.aws_secret_access_key, endpoint_url=self.endpoint_url)
            if self.anon:
                opts["anon"] = True
        elif protocol in ("gs", "gcs"):
            _put(opts, token=self.gcs_token or ("anon" if self.anon else None), endpoint_url=self.endpoint_url)
        elif protocol in ("az", "abfs", "abfss", "adl"):
            _put(
                opts,
                connection_string=self.azure_connection_string,
                account_name=self.azure_account_name,
                account_key=self.azure_account_key,
            )
            if self.anon:
                opts["anon"] = True
        return opts

    def dataset(self) -> Dataset:
        return Dataset(_plain(self.dataset_url), self.storage_options(), index_url=_plain(self.index_url),
                       output_url=_plain(self.output_url))


def _plain(value: Any) -> Any:
    """The value of a setting. Inside a run or a sensor Dagster has replaced a ``dg.EnvVar`` by its
    value; outside (the headless runner calls ``dataset()`` directly) it is still the name."""
    return value.get_value() if isinstance(value, dg.EnvVar) else value


def _put(opts: dict[str, Any], **values: Any) -> None:
    for k, v in values.items():
        v = _plain(v)
        if v is not None and v != "":
            opts[k] = v


def _from_env(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


def storage_from_env(dataset_url: str | None = None, *, index_url: str | None = None,
                     output_url: str | None = None, extra_options: dict[str, Any] | None = None) -> ShardStorage:
    """The resource as configured by the environment: CURATOR_DATASET_URL, CURATOR_INDEX_URL,
    CURATOR_OUTPUT_URL, CURATOR_ENDPOINT_URL, AZURE_STORAGE_ACCOUNT and the credential variables in
    SECRET_ENV, each as a ``dg.EnvVar`` (the UI shows the variable's name, never its value, and
    every process reads its own environment); the arguments, when given, win over the environment."""
    secrets = {field: dg.EnvVar(env) for field, env in SECRET_ENV.items() if os.environ.get(env)}
    options = dict(extra_options or {})
    endpoint = options.pop("endpoint_url", None) or _from_env("CURATOR_ENDPOINT_URL")
    return ShardStorage(
        dataset_url=dataset_url or _from_env("CURATOR_DATASET_URL") or "demo_data",
        index_url=index_url or _from_env("CURATOR_INDEX_URL"),
        output_url=output_url or _from_env("CURATOR_OUTPUT_URL"),
        endpoint_url=endpoint,
        azure_account_name=_from_env("AZURE_STORAGE_ACCOUNT"),
        extra_options=options,
        **secrets,
    )
