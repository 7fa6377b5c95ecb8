#!/usr/bin/env python3
"""Download the wheels the GPU machine lacks, following Requires-Dist.

Called by tools/gpu/fetch_wheels.sh (which makes the venv this runs in: it
needs `packaging`). Each package is fetched with `pip download --no-deps` for
CPython 3.12 on manylinux x86_64 (the GPU machine), its METADATA read, and its
requirements followed (markers evaluated for that machine, no extras), except
packages the machine already has (tools/gpu/device_packages.txt) and those in
SKIP below. A package with no wheel for that platform but a pure-Python sdist
is built into a wheel here. Writes the resolved set, one `name==version` a line,
to --lock; with --from-lock, downloads exactly those instead of resolving.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# The GPU machine: /work/.library/device/KINDS.md (python3 is 3.12.3 there).
# PY_VERSION (3.12 by default) is only for rehearsing the install on another Python here.
PY_VERSION = os.environ.get('PY_VERSION', '3.12')
TARGET_ENV = dict(default_environment())
TARGET_ENV.update(
    python_version=PY_VERSION,
    python_full_version='3.12.3' if PY_VERSION == '3.12' else PY_VERSION + '.0',
    os_name='posix',
    sys_platform='linux', platform_system='Linux', platform_machine='x86_64',
    implementation_name='cpython', platform_python_implementation='CPython',
    extra='')

PIP_WHEEL_FLAGS = [
    '--no-deps', '--only-binary=:all:', '--python-version', PY_VERSION,
    '--implementation', 'cp',
] + [x for n in ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64',
                 'manylinux_2_17_x86_64', 'manylinux2014_x86_64',
                 'manylinux1_x86_64', 'manylinux_2_24_x86_64',
                 'manylinux_2_31_x86_64', 'manylinux_2_34_x86_64',
                 'manylinux_2_35_x86_64')
     for x in ('--platform', n)]

# Provided on the machine under another distribution name (same import name).
ALIASES = {
    'opencv-python': 'opencv-python-headless',   # mmengine, mmcv: cv2
}

# Requirements never fetched: not needed to build, train or test there.
SKIP = {
    # openmim -> opendatalab -> openxlab (dataset download service, pins old
    # requests/setuptools); `mim train/test/run` never import it.
    'opendatalab': 'only `mim download --dataset` uses it',
    'openxlab': 'only `mim download --dataset` uses it',
    'pip': 'the machine has pip',
}


def norm(name):
    return canonicalize_name(name)


def read_present(path):
    names = set()
    for line in Path(path).read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            names.add(norm(line))
    return names


def read_pins(path):
    pins = {}
    if path and Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            line = line.split('#', 1)[0].strip()
            if '==' in line:
                name, ver = line.split('==', 1)
                pins[norm(name)] = ver.strip()
    return pins


def wheel_requires(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist()
                    if re.fullmatch(r'[^/]+\.dist-info/METADATA', n))
        msg = Parser().parsestr(zf.read(meta).decode('utf-8'))
    return msg.get_all('Requires-Dist') or []


def saved_path(output, dest):
    for pat in (r'Saved (\S+)', r'File was already downloaded (\S+)'):
        found = re.findall(pat, output)
        if found:
            return Path(found[-1])
    return None


def pip_download(spec, dest, python):
    """Fetch one wheel for the GPU machine; build a pure-Python one if needed."""
    cmd = [python, '-m', 'pip', 'download', '--disable-pip-version-check',
           '-d', str(dest)] + PIP_WHEEL_FLAGS + [spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode == 0:
        path = saved_path(res.stdout, dest)
        if path and path.suffix == '.whl':
            return path
    # No wheel for CPython 3.12 manylinux: try a pure-Python sdist.
    with tempfile.TemporaryDirectory() as tmp:
        res2 = subprocess.run(
            [python, '-m', 'pip', 'wheel', '--disable-pip-version-check',
             '--no-deps', '--no-binary=:all:', '-w', tmp, spec],
            capture_output=True, text=True)
        built = list(Path(tmp).glob('*.whl'))
        if res2.returncode != 0 or not built:
            sys.exit(f'resolve_wheels: no wheel for {spec!r} for CPython 3.12 '
                     f'manylinux x86_64, and no sdist built:\n'
                     f'{res.stdout[-2000:]}{res.stderr[-2000:]}'
                     f'{res2.stderr[-2000:]}')
        wheel = built[0]
        _, _, _, tags = parse_wheel_filename(wheel.name)
        if not any(t.abi == 'none' and t.platform == 'any' for t in tags):
            sys.exit(f'resolve_wheels: {spec!r} has no wheel for the GPU '
                     f'machine and its sdist is not pure Python ({wheel.name})')
        target = Path(dest) / wheel.name
        target.write_bytes(wheel.read_bytes())
        print(f'  built from its sdist: {wheel.name}')
        return target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--dest', required=True, type=Path)
    ap.add_argument('--present', required=True)
    ap.add_argument('--pins', help='constraints file: versions to prefer')
    ap.add_argument('--lock', required=True, type=Path)
    ap.add_argument('--from-lock', action='store_true')
    ap.add_argument('roots', nargs='*')
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    present = read_present(args.present)
    pins = read_pins(args.pins)

    got = {}          # name -> (Version, wheel path)
    relied = {}       # name on the machine -> set of specs asked for
    skipped = {}

    if args.from_lock:
        for line in args.lock.read_text().splitlines():
            line = line.split('#', 1)[0].strip()
            if not line:
                continue
            print(f'fetch {line}')
            path = pip_download(line, args.dest, python)
            name, ver, _, _ = parse_wheel_filename(path.name)
            got[norm(name)] = (ver, path)
    else:
        queue = [(Requirement(r), '(root)') for r in args.roots]
        while queue:
            req, parent = queue.pop(0)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue
            name = norm(req.name)
            provided = ALIASES.get(name, name)
            # A root is fetched even where the machine has the package (setuptools: the
            # machine's may be >= 81, which has no pkg_resources).
            if provided in present and parent != '(root)':
                relied.setdefault(provided, set()).add(
                    f'{req.name}{req.specifier or ""} (for {parent})')
                continue
            if name in SKIP:
                skipped[name] = f'{SKIP[name]} (wanted by {parent})'
                continue
            if name in got:
                ver = got[name][0]
                if req.specifier and ver not in req.specifier:
                    sys.exit(f'resolve_wheels: {parent} needs {req}, but '
                             f'{name} {ver} was chosen for another package')
                continue
            spec = req.name + str(req.specifier)
            pin = pins.get(name)
            if pin and (not req.specifier or Version(pin) in req.specifier):
                spec = f'{req.name}=={pin}'
            print(f'fetch {spec}  <- {parent}')
            path = pip_download(spec, args.dest, python)
            wname, ver, _, _ = parse_wheel_filename(path.name)
            got[name] = (ver, path)
            for line in wheel_requires(path):
                queue.append((Requirement(line), f'{wname} {ver}'))
        args.lock.write_text(
            '# Written by tools/gpu/fetch_wheels.sh --resolve: the wheels the GPU machine lacks\n'
            '# (CPython 3.12, manylinux x86_64), one version each. Edit by re-resolving.\n'
            + ''.join(f'{n}=={v}\n' for n, (v, _) in sorted(got.items())))
        print(f'wrote {args.lock}')

    # Keep one version of each: drop every other wheel in dest.
    keep = {p.name for _, p in got.values()}
    for whl in args.dest.glob('*.whl'):
        if whl.name not in keep:
            print(f'remove stale {whl.name}')
            whl.unlink()
    names = [norm(parse_wheel_filename(p.name)[0]) for p in args.dest.glob('*.whl')]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        sys.exit(f'resolve_wheels: two versions of {sorted(dups)} in {args.dest}')
    if relied:
        print('\nleft to the GPU machine\'s own packages (installed there with --no-deps):')
        for name in sorted(relied):
            print(f'  {name}: ' + '; '.join(sorted(relied[name])))
    for name, why in sorted(skipped.items()):
        print(f'skipped {name}: {why}')


if __name__ == '__main__':
    main()
