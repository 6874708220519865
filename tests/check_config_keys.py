#!/usr/bin/env python3
"""Every config key lives in three places: its field in config/config.h (with a default and a
/// line), its entry in VisitFields (config/config.cc), through which loading, the environment
overrides, printing and YAML output all go, and, for a number, a range check in
Config::Validate that names it. Fails, naming the key and the place, when one is missing; run
by ctest (unit.config_keys).
usage: check_config_keys.py SOURCE_DIR"""
import re
import sys

SECTIONS = {"ModelConfig": "model", "DiffusionConfig": "diffusion", "TrainConfig": "train",
            "DataConfig": "data", "SampleConfig": "sample", "EvalConfig": "eval",
            "DistConfig": "dist"}
NUMERIC = re.compile(r"^(int|int64_t|uint64_t|double|float|std::vector<(int|double)>)$")
# Numbers that take any value, each with its reason.
ANY_VALUE = {
    "train.seed": "any 64-bit value seeds the run",
    "sample.seed": "any 64-bit value seeds the samples",
    "eval.seed": "any 64-bit value seeds the evaluation",
}


def fields(header):
    """{section: [(key, type, has_default, has_doc)]} from the section structs."""
    out = {}
    for struct, section in SECTIONS.items():
        match = re.search(r"struct " + struct + r" \{\n(.*?)\n\};", header, re.S)
        if not match:
            sys.exit(f"check_config_keys: FAIL: config/config.h has no struct {struct}")
        lines = match.group(1).split("\n")
        found = []
        for i, line in enumerate(lines):
            m = re.match(r"^  ([A-Za-z_:<>, 0-9]+?) ([a-z_0-9]+)( = [^;]+| ?\{[^;]*\})?;$", line)
            if not m or line.strip().startswith(("///", "//")) or "(" in line:
                continue
            doc = i > 0 and lines[i - 1].strip().startswith("///")
            found.append((m.group(2), m.group(1).strip(), m.group(3) is not None, doc))
        out[section] = found
    return out


def main():
    src = sys.argv[1]
    header = open(f"{src}/config/config.h").read()
    source = open(f"{src}/config/config.cc").read()
    visits = re.findall(r'visit\("([a-z]+)", "([a-z_0-9]+)", c\.([a-z]+)\.([a-z_0-9]+)\);', source)
    body = re.search(r"void Config::Validate\(int world_size\) const \{(.*?)\n\}\n", source, re.S)
    if not body:
        sys.exit("check_config_keys: FAIL: no Config::Validate in config/config.cc")
    validate = body.group(1)
    problems = []
    visited = {}
    for section, key, member_section, member in visits:
        if (section, key) != (member_section, member):
            problems.append(f'VisitFields names "{section}.{key}" but visits c.{member_section}.{member}')
        if (section, key) in visited:
            problems.append(f"VisitFields visits {section}.{key} twice")
        visited[(section, key)] = True
    keys = 0
    for section, members in fields(header).items():
        for key, kind, has_default, has_doc in members:
            keys += 1
            name = f"{section}.{key}"
            if (section, key) not in visited:
                problems.append(f"{name} (config/config.h) is missing from VisitFields (config/config.cc): "
                                "it would not load, print or take its DDPM_ override")
            # A std:: container starts empty; a scalar or an enum needs its default written.
            if not has_default and not kind.startswith("std::"):
                problems.append(f"{name} has no default in config/config.h")
            if not has_doc:
                problems.append(f"{name} has no /// line in config/config.h")
            if NUMERIC.match(kind) and name not in ANY_VALUE and f'"{name}"' not in validate:
                problems.append(f"{name} ({kind}) has no range check naming it in Config::Validate")
            visited.pop((section, key), None)
    for section, key in visited:
        problems.append(f"VisitFields visits {section}.{key}, which no section struct declares")
    if problems:
        for problem in problems:
            print(f"check_config_keys: {problem}")
        sys.exit(f"check_config_keys: FAIL: {len(problems)} problem(s)")
    print(f"check_config_keys: {keys} keys, each declared, visited and (numbers) range-checked")


main()
