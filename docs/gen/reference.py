"""The reference pages, made from the code they describe so that they cannot drift.

- ``reference/site-file.md``: every model of the site file, from its JSON Schema
  (``hapair.shared.topology.site_schema()``, the pydantic models that read the file);
- ``reference/http-api.md``: every route of the registry, from its OpenAPI document;
- ``reference/cli.md``: the ``--help`` of every command and subcommand, from argparse.

The pages are made at each build (``docs/gen/hooks.py`` hands them to mkdocs) and never
written into ``docs/``: nothing generated is committed, so nothing can go stale.
``python docs/gen/reference.py DIR`` writes them into DIR, to read them as files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

Schema = Mapping[str, Any]


# --- JSON Schema, as tables ----------------------------------------------------------


def _cell(text: str) -> str:
    """Text for a table cell: one line, its pipes escaped outside code spans (inside
    one, a pipe is no column separator and a backslash would be shown)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


# A placeholder of the site file, with what is glued to it: {node.name}, {plc}.{tag}, {pair}.db
PLACEHOLDER = re.compile(r"\{[\w.]+\}(?:\.?(?:\{[\w.]+\}|\w+))*")


def _prose(text: str) -> str:
    """A description in Markdown: its placeholders in code spans (at the end of a table
    cell, attr_list would take ``{package.dir}`` for attributes and drop it)."""
    parts = text.split("`")
    return "`".join(
        p if i % 2 else PLACEHOLDER.sub(lambda m: f"`{m.group(0)}`", p) for i, p in enumerate(parts)
    )


def _code(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`"


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def anchor(name: str) -> str:
    return "schema-" + name.lower()


def type_of(schema: Schema) -> str:
    """A schema's type in words, with a link to each model it names."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{anchor(name)})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(type_of(s) for s in schema[key])
    if "const" in schema:
        return _code(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(_code(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return "list of " + type_of(schema.get("items", {}))
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping):
            return "map of string to " + type_of(values)
        if "patternProperties" in schema:
            pattern, values = next(iter(schema["patternProperties"].items()))
            return f"map of {_code(pattern)} to {type_of(values)}"
        return "object"
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind)
    return str(kind) if kind else "any"


_BOUNDS = (
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "≤ {}"),
    ("exclusiveMaximum", "< {}"),
    ("minItems", "{} or more items"),
    ("maxItems", "{} items at most"),
    ("minLength", "{} or more characters"),
    ("maxLength", "{} characters at most"),
    ("pattern", "matches `{}`"),
)


def constraints(schema: Schema) -> list[str]:
    """The bounds of a schema and of its alternatives (anyOf), in words."""
    found = [text.format(schema[key]) for key, text in _BOUNDS if key in schema]
    for alternative in schema.get("anyOf", []):
        found += constraints(alternative)
    return found


def default_of(name: str, schema: Schema, required: set[str]) -> str:
    if name in required:
        return "required"
    if "default" in schema:
        return _code(schema["default"])
    return "its own defaults" if "$ref" in schema else "empty"


def model_table(schema: Schema) -> list[str]:
    """One row per field of an object schema: name, type, default, description."""
    required = set(schema.get("required", []))
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in schema.get("properties", {}).items():
        words = [_prose(field.get("description", "")), *constraints(field)]
        text = "; ".join(w for w in words if w)
        lines.append(
            f"| `{name}` | {_cell(type_of(field))} | {_cell(default_of(name, field, required))} "
            f"| {_cell(text)} |"
        )
    return lines


def model_section(name: str, schema: Schema, level: str = "##") -> list[str]:
    lines = [f"{level} {name} {{#{anchor(name)}}}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    if schema.get("properties"):
        lines += model_table(schema)
    else:
        lines.append(f"A value of type {type_of(schema)}.")
    if schema.get("additionalProperties") is False:
        lines += ["", "No other field is accepted."]
    return [*lines, ""]


def _refs(schema: object) -> Iterator[str]:
    if isinstance(schema, Mapping):
        if "$ref" in schema:
            yield _ref_name(schema["$ref"])
        for value in schema.values():
            yield from _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _refs(value)


def reading_order(top: Schema, defs: Mapping[str, Schema]) -> list[str]:
    """The models in the order a reader meets them, from the top down (breadth first)."""
    order: list[str] = []
    queue = list(_refs(top))
    while queue:
        name = queue.pop(0)
        if name in order or name not in defs:
            continue
        order.append(name)
        queue += _refs(defs[name])
    return order + sorted(set(defs) - set(order))


# --- the pages -------------------------------------------------------------------------


def site_file_page() -> str:
    from hapair.shared.topology import site_schema

    schema = site_schema()
    defs: Mapping[str, Schema] = schema.get("$defs", {})
    lines = [
        "# Site file reference",
        "",
        "Every field of the site file, made from the models that read it. What the fields",
        "mean and how they work together: [The site file](../site-file.md). The same",
        "schema, for editors that validate and complete site files, is printed by",
        "`hapair topology schema`.",
        "",
        *model_section("Site", {**schema, "description": "The site file's top level."}),
    ]
    top = {k: v for k, v in schema.items() if k != "$defs"}
    for name in reading_order(top, defs):
        lines += model_section(name, defs[name])
    return "\n".join(lines)


_METHODS = ("get", "put", "post", "patch", "delete")


def http_api_page() -> str:
    from hapair.registry.openapi import document
    from hapair.registry.routes import ROUTES

    doc = document(ROUTES)
    info = doc["info"]
    schemas: Mapping[str, Schema] = doc.get("components", {}).get("schemas", {})
    lines = [
        "# HTTP API reference",
        "",
        f"The registry's routes (version {info['version']}), made from the OpenAPI",
        "document it serves at `GET /v1/openapi.json`. How they are used, with examples:",
        "[The registry](../registry.md#http-api).",
        "",
        " ".join(info.get("description", "").split()),
        "",
        "## Routes",
        "",
    ]
    for path, operations in doc["paths"].items():
        for method in _METHODS:
            if method in operations:
                lines += _operation(method, path, operations[method])
    lines += ["## Schemas", ""]
    for name in sorted(schemas):
        lines += model_section(name, schemas[name], level="###")
    return "\n".join(lines)


def _operation(method: str, path: str, op: Schema) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", op.get("summary", ""), ""]
    if op.get("description"):
        lines += [" ".join(op["description"].split()), ""]
    if op.get("security") == []:
        lines += ["No authentication.", ""]
    elif "security" in op:
        schemes = sorted({s for req in op["security"] for s in req})
        lines += ["Authentication: " + ", ".join(f"`{s}`" for s in schemes) + ".", ""]
    if op.get("parameters"):
        lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in op["parameters"]:
            words = [p.get("description", ""), *constraints(p.get("schema", {}))]
            lines.append(
                f"| `{p['name']}` | {p['in']} | {_cell(type_of(p.get('schema', {})))} "
                f"| {'yes' if p.get('required') else 'no'} "
                f"| {_cell('; '.join(w for w in words if w))} |"
            )
        lines.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines += [f"Body ({media}): {type_of(content.get('schema', {}))}.", ""]
    lines += ["| status | answer | body |", "|---|---|---|"]
    for status, reply in op.get("responses", {}).items():
        bodies = [
            f"{type_of(c.get('schema', {}))} ({media})"
            for media, c in reply.get("content", {}).items()
        ]
        headers = [
            f"header `{h}`: {d.get('description', '')}" for h, d in reply.get("headers", {}).items()
        ]
        lines.append(
            f"| {status} | {_cell('; '.join([reply.get('description', ''), *headers]))} "
            f"| {_cell(', '.join(bodies))} |"
        )
    return [*lines, ""]


@contextlib.contextmanager
def _plain_environment() -> Iterator[None]:
    """Help texts as a fresh shell shows them: no HAPAIR_ setting given (some defaults
    come from the environment), and 100 columns."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("HAPAIR_")]:
        del os.environ[key]
    os.environ["COLUMNS"] = "100"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def help_of(main: Callable[[list[str]], object]) -> str:
    """What ``COMMAND --help`` prints: argparse prints it and exits before anything runs."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    return out.getvalue()


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub.prog, sub
                yield from _subcommands(sub)


def _help_block(title: str, text: str) -> list[str]:
    return [f"## `{title}`", "", "```text", text.rstrip(), "```", ""]


def cli_page() -> str:
    from hapair.comm_server.main import main as comm
    from hapair.registry.console.cli import parser
    from hapair.registry.main import main as registry
    from hapair.shared.client.proxy import main as proxy
    from hapair.workshop_agent.main import main as agent

    lines = [
        "# Command-line reference",
        "",
        "The `--help` of every command, made from their argument parsers. What the",
        "operator's commands do, with examples: [The operator CLI](../cli.md); the daemons:",
        "[the agent](../agent.md), [the registry](../registry.md),",
        "[the comm server](../plc.md), [the proxy](../clients.md).",
        "",
    ]
    with _plain_environment():
        root = parser()
        lines += _help_block(root.prog, root.format_help())
        for prog, sub in _subcommands(root):
            lines += _help_block(prog, sub.format_help())
        for command, main in (
            ("hapair-agent", agent),
            ("hapair-registry", registry),
            ("hapair-comm", comm),
            ("hapair-proxy", proxy),
        ):
            lines += _help_block(command, help_of(main))
    return "\n".join(lines)


PAGES: dict[str, Callable[[], str]] = {
    "reference/site-file.md": site_file_page,
    "reference/http-api.md": http_api_page,
    "reference/cli.md": cli_page,
}


def pages() -> dict[str, str]:
    """Every reference page: its path under docs/ and its Markdown."""
    if str(ROOT) not in sys.path:
        # This tree's code, not another copy installed in the environment.
        sys.path.insert(0, str(ROOT))
    return {path: make().rstrip() + "\n" for path, make in PAGES.items()}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "reference-pages")
    for path, text in pages().items():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text(text)
        print(target / path)
