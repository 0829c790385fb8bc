"""Checks Kubernetes manifests against the API's schema, offline.

The schema is the one the official Python client (`kubernetes`, pinned in
requirements.txt next to this file) is generated from: every object's
fields, their types and which are required. Each document of each file
given is checked against the model of its apiVersion and kind, strictly:
an unknown field (a typo, a field in the wrong place), a value of the
wrong type or a missing required field is an error. Prints one line per
error and exits 1 if there is any; prints the documents checked otherwise.

Usage: python k8s_schema.py FILE... (YAML, `---`-separated; `-` reads JSON
documents, a list, from stdin: rendered Helm templates).
"""

import json
import re
import sys

import yaml
from kubernetes.client import models

SCALARS = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "datetime": str,
    "date": str,
}


def model_for(doc):
    """The model class of a document: apiVersion apps/v1 + kind
    StatefulSet -> V1StatefulSet."""
    api = doc.get("apiVersion", "")
    version = api.split("/")[-1]
    name = version[:1].upper() + version[1:] + doc.get("kind", "")
    return getattr(models, name, None)


def check(value, typ, path, errors):
    if typ == "object":
        return  # IntOrString, RawExtension, any JSON
    if typ in SCALARS:
        ok = isinstance(value, SCALARS[typ]) and not (
            typ in ("int", "float") and isinstance(value, bool)
        )
        if not ok:
            errors.append(f"{path}: expected {typ}, found {type(value).__name__} {value!r}")
        return
    m = re.fullmatch(r"List\[(.+)\]", typ)
    if m:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, found {value!r}")
            return
        for i, v in enumerate(value):
            check(v, m.group(1), f"{path}[{i}]", errors)
        return
    m = re.fullmatch(r"Dict\[str, (.+)\]", typ)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, found {value!r}")
            return
        for k, v in value.items():
            check(v, m.group(1), f"{path}.{k}", errors)
        return
    cls = getattr(models, typ, None)
    if cls is None:
        errors.append(f"{path}: the schema has no type {typ}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {typ} object, found {value!r}")
        return
    by_json = {j: a for a, j in cls.attribute_map.items()}
    for k, v in value.items():
        attr = by_json.get(k)
        if attr is None:
            errors.append(f"{path}.{k}: no such field in {typ}")
            continue
        if v is None:
            continue
        check(v, cls.openapi_types[attr], f"{path}.{k}", errors)
    for attr, field in cls.model_fields.items():
        j = cls.attribute_map.get(attr, attr)
        if field.is_required() and value.get(j) is None:
            errors.append(f"{path}.{j}: required in {typ}, missing")


def main(args):
    docs = []
    for f in args:
        if f == "-":
            docs += [(f"stdin[{i}]", d) for i, d in enumerate(json.load(sys.stdin))]
        else:
            with open(f) as fh:
                docs += [
                    (f"{f}[{i}]", d)
                    for i, d in enumerate(yaml.safe_load_all(fh))
                    if d is not None
                ]
    errors = []
    checked = []
    for where, doc in docs:
        cls = model_for(doc)
        if cls is None:
            errors.append(f"{where}: unknown apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}")
            continue
        name = doc.get("metadata", {}).get("name", "?")
        check(doc, cls.__name__, f"{where} {doc.get('kind')}/{name}", errors)
        checked.append(f"{doc.get('apiVersion')} {doc.get('kind')} {name}")
    for e in errors:
        print(e)
    if errors:
        return 1
    for c in checked:
        print("ok", c)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
