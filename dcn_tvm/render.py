"""Render the jinja2 templates shipped in dcn_tvm.templates (StrictUndefined: a missing value is an error)."""

from __future__ import annotations

import functools
import importlib.resources

import jinja2


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(importlib.resources.files("dcn_tvm.templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render(template: str, **values) -> str:
    return _environment().get_template(template).render(**values)
