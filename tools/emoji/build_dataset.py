#!/usr/bin/env python3
"""Build the emoji image-caption training set for diffctl's embedded default model.

The data comes only from two pinned npm packages, downloaded over HTTPS from
the npm registry and verified against pinned sha512 integrity hashes:

* ``@iconify-json/fluent-emoji-flat`` -- Microsoft Fluent Emoji (flat style,
  MIT) as an Iconify JSON icon set on a 32x32 grid.  Provides the artwork,
  the icon names (used as captions), the categories and a codepoint -> name
  map (``chars.json``).
* ``emojibase-data`` -- emoji metadata (MIT) whose English labels and tags are
  derived from Unicode CLDR annotations.  Provides extra keywords so the
  trainer can sample caption variants.

Usage::

    python3 tools/emoji/build_dataset.py [--out DIR] [--cache DIR]
                                         [--limit N] [--skin-tones]

    --out DIR       output folder (default: target/emoji-dataset)
    --cache DIR     download cache (default: ~/.cache/diffctl-emoji); a cached
                    tarball whose hash matches is used without any network
    --limit N       only write the first N icons (sorted by name), for tests
    --skin-tones    also write the skin-tone variants (see below)
    --no-skin-tones the default: skip skin-tone variants
    --registry URL  npm registry base (default: https://registry.npmjs.org)
    --force         allow writing into a non-empty folder that does not hold
                    a previous dataset

Output (all file lists sorted by icon name, so reruns are byte-identical)::

    DIR/<name>.svg              standalone SVG document per icon
    DIR/<name>.txt              caption, e.g. "smiling cat with heart eyes"
    DIR/metadata.jsonl          one JSON object per line:
                                {"file_name": "<name>.svg", "text": caption,
                                 "keywords": [...], "category": ...,
                                 "emoji": ..., "hexcode": ..., "name": ...}
    DIR/LICENSE-fluent-emoji.txt
    DIR/LICENSE-emojibase.txt
    DIR/NOTICE.txt              provenance of the data

Selection rules:

* Icons flagged ``hidden`` in the Iconify set are skipped: they are old names
  kept for backwards compatibility and duplicate visible icons.
* Aliases are resolved against their parent.  An alias that adds a
  transformation (``hFlip``/``vFlip``/``rotate``) is a distinct picture (e.g.
  ``backhand-index-pointing-right`` is the mirrored left-pointing hand) and is
  written; an alias without one is a pure rename of its parent (e.g. the typo
  fix ``japanese-hear-button``) and is skipped as a duplicate.
* Skin-tone variants (codepoints U+1F3FB..U+1F3FF, names ending in ``-light``,
  ``-medium-light``, ``-medium``, ``-medium-dark``, ``-dark``) are skipped by
  default: they are ~1,500 near-duplicates of ~300 base pictures that differ
  only in the skin colour, and would make half of the training set "People &
  Body".  With ``--skin-tones`` they are written with captions such as
  "waving hand, medium-dark skin tone".

Captions: the Fluent name with hyphens replaced by spaces.  When the CLDR label
from emojibase differs from the name only by apostrophes or diacritics, the
(ASCII-folded) label is used instead, so ``mans-shoe`` -> "man's shoe",
``eight-oclock`` -> "eight o'clock", ``piata`` -> "pinata".

Keywords: the emojibase (CLDR) label if it differs from the caption, the
emojibase tags, and the Iconify category in lower case; folded to ASCII
(keywords that stay non-ASCII, such as "×", are dropped), deduplicated, in
that order.  Icons are matched to emojibase entries by codepoint sequence
(from the set's ``chars.json``, ignoring U+FE0F/U+FE0E) and, failing that,
by normalised label.

Rasterisation is not done here (diffctl rasterises the SVGs with resvg); every
SVG written is checked to parse as XML and failures are reported.

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import unicodedata
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

# --------------------------------------------------------------------------
# Pinned inputs.  Bump versions and hashes together; the hashes are the
# registry's dist.integrity values for exactly these versions.
# --------------------------------------------------------------------------

FLUENT_PACKAGE = "@iconify-json/fluent-emoji-flat"
FLUENT_VERSION = "1.2.6"
FLUENT_INTEGRITY = (
    "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw=="
)
FLUENT_SHASUM = "5586071d17e0d3460c185a67effc389f0bd95907"

EMOJIBASE_PACKAGE = "emojibase-data"
EMOJIBASE_VERSION = "17.0.0"
EMOJIBASE_INTEGRITY = (
    "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA=="
)
EMOJIBASE_SHASUM = "5816fba6395da6b567fbd54b029ca6b5de2d9255"

DEFAULT_REGISTRY = "https://registry.npmjs.org"
DEFAULT_CACHE = "~/.cache/diffctl-emoji"
DEFAULT_OUT = "target/emoji-dataset"

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"

# Fitzpatrick modifiers and the suffixes Fluent/Iconify names use for them.
SKIN_TONE_CODEPOINTS = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
SKIN_TONE_SUFFIXES = {  # longest first matters for matching
    "medium-light": "medium-light skin tone",
    "medium-dark": "medium-dark skin tone",
    "light": "light skin tone",
    "medium": "medium skin tone",
    "dark": "dark skin tone",
}

# The @iconify-json package ships no LICENSE file (its package.json says MIT
# and info.json points at the upstream repository), so the upstream licence
# of microsoft/fluentui-emoji is reproduced here.
FLUENT_LICENSE_URL = "https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE"
FLUENT_LICENSE_TEXT = """\
MIT License

Copyright (c) Microsoft Corporation.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


# --------------------------------------------------------------------------
# Download and verification
# --------------------------------------------------------------------------


class Package:
    """A pinned npm package tarball, read in memory."""

    def __init__(self, name: str, version: str, integrity: str, shasum: str):
        self.name = name
        self.version = version
        self.integrity = integrity
        self.shasum = shasum
        self.tarball_url = ""
        self._tar: tarfile.TarFile | None = None

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def cache_file(self, cache: Path) -> Path:
        safe = self.name.lstrip("@").replace("/", "+")
        return cache / f"{safe}-{self.version}.tgz"

    def verify(self, data: bytes) -> None:
        """Raise if `data` does not match the pinned sha512 integrity and sha1."""
        algo, _, b64 = self.integrity.partition("-")
        if algo != "sha512":
            raise ValueError(f"{self.spec}: unsupported integrity {algo}")
        got = base64.b64encode(hashlib.sha512(data).digest()).decode()
        if got != b64:
            raise ValueError(f"{self.spec}: sha512 mismatch (got sha512-{got})")
        sha1 = hashlib.sha1(data).hexdigest()
        if sha1 != self.shasum:
            raise ValueError(f"{self.spec}: shasum mismatch (got {sha1})")

    def fetch(self, registry: str, cache: Path) -> None:
        """Load the tarball from the cache, or download, verify and cache it."""
        path = self.cache_file(cache)
        data = None
        if path.is_file():
            data = path.read_bytes()
            try:
                self.verify(data)
                self.tarball_url = self._default_tarball_url(registry)
            except ValueError as err:
                print(f"warning: discarding cached {path.name}: {err}", file=sys.stderr)
                data = None
        if data is None:
            data = self._download(registry)
            self.verify(data)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        self._tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")

    def _default_tarball_url(self, registry: str) -> str:
        base = self.name.rsplit("/", 1)[-1]
        return f"{registry}/{self.name}/-/{base}-{self.version}.tgz"

    def _download(self, registry: str) -> bytes:
        # The per-version document carries dist.tarball / dist.integrity.
        doc_url = f"{registry}/{urllib.parse.quote(self.name, safe='@')}/{self.version}"
        print(f"fetching {doc_url}", file=sys.stderr)
        doc = json.loads(_http_get(doc_url))
        dist = doc.get("dist", {})
        if dist.get("integrity") != self.integrity:
            raise ValueError(
                f"{self.spec}: registry integrity {dist.get('integrity')!r} "
                f"differs from the pinned {self.integrity!r}"
            )
        self.tarball_url = dist["tarball"]
        print(f"fetching {self.tarball_url}", file=sys.stderr)
        return _http_get(self.tarball_url)

    def read(self, member: str) -> bytes:
        """Return the bytes of `package/<member>` inside the tarball."""
        assert self._tar is not None
        fobj = self._tar.extractfile(f"package/{member}")
        if fobj is None:
            raise KeyError(f"{self.spec}: package/{member} is not a file")
        return fobj.read()

    def read_json(self, member: str):
        return json.loads(self.read(member).decode("utf-8"))


def _http_get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "diffctl-emoji-dataset"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


# --------------------------------------------------------------------------
# Iconify icon resolution and SVG building
# --------------------------------------------------------------------------

ICON_DEFAULTS = {"left": 0, "top": 0, "width": 16, "height": 16,
                 "rotate": 0, "hFlip": False, "vFlip": False}


def resolve_icon(icon_set: dict, name: str) -> dict:
    """Return the full icon data for `name` (an icon or alias), following
    Iconify's rules: set-level dimensions are the defaults, an alias overrides
    its parent's dimensions, and transformations are combined."""
    icons = icon_set["icons"]
    aliases = icon_set.get("aliases", {})
    chain = []
    seen = set()
    current = name
    while current not in icons:
        if current in seen or current not in aliases:
            raise KeyError(f"cannot resolve icon {name!r}")
        seen.add(current)
        chain.append(aliases[current])
        current = aliases[current]["parent"]
    result = {k: icon_set.get(k, v) for k, v in ICON_DEFAULTS.items()}
    # Parent first, then aliases from the innermost outwards.
    for layer in [icons[current]] + chain[::-1]:
        for key in ("left", "top", "width", "height"):
            if key in layer:
                result[key] = layer[key]
        result["rotate"] = (result["rotate"] + layer.get("rotate", 0)) % 4
        result["hFlip"] = result["hFlip"] != layer.get("hFlip", False)
        result["vFlip"] = result["vFlip"] != layer.get("vFlip", False)
    result["body"] = icons[current]["body"]
    result["parent"] = current
    return result


def _num(value: float) -> str:
    """Format a number the way SVG authors would (no trailing .0)."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def icon_to_svg(icon: dict) -> str:
    """Build a standalone SVG document, following @iconify/utils iconToSVG()."""
    left, top = icon["left"], icon["top"]
    width, height = icon["width"], icon["height"]
    body = icon["body"]
    rotation = icon["rotate"]
    transforms: list[str] = []
    if icon["hFlip"]:
        if icon["vFlip"]:
            rotation += 2
        else:
            transforms.append(f"translate({_num(width + left)} {_num(-top)})")
            transforms.append("scale(-1 1)")
            left = top = 0
    elif icon["vFlip"]:
        transforms.append(f"translate({_num(-left)} {_num(height + top)})")
        transforms.append("scale(1 -1)")
        left = top = 0
    rotation %= 4
    if rotation == 1:
        c = height / 2 + top
        transforms.insert(0, f"rotate(90 {_num(c)} {_num(c)})")
    elif rotation == 2:
        transforms.insert(0, f"rotate(180 {_num(width / 2 + left)} {_num(height / 2 + top)})")
    elif rotation == 3:
        c = width / 2 + left
        transforms.insert(0, f"rotate(-90 {_num(c)} {_num(c)})")
    if rotation % 2 == 1:
        left, top = top, left
        width, height = height, width
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    xlink = f' xmlns:xlink="{XLINK_NS}"' if "xlink:" in body else ""
    return (
        f'<svg xmlns="{SVG_NS}"{xlink} width="{_num(width)}" height="{_num(height)}" '
        f'viewBox="{_num(left)} {_num(top)} {_num(width)} {_num(height)}">'
        f"{body}</svg>\n"
    )


# --------------------------------------------------------------------------
# Names, captions and emojibase matching
# --------------------------------------------------------------------------


_TYPOGRAPHIC = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2013": "-", "\u2014": "-", "\u2212": "-",
})


def ascii_fold(text: str) -> str:
    """Fold typographic quotes, dashes and diacritics to ASCII ("piñata" -> "pinata")."""
    text = text.translate(_TYPOGRAPHIC)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def name_key(text: str) -> str:
    """Normalise a label or an Iconify name to Iconify's hyphenated form."""
    text = ascii_fold(text).lower().replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def hex_key(hexcode: str) -> str:
    """Normalise a codepoint sequence: lower case, without variation selectors."""
    parts = hexcode.lower().replace("_", "-").split("-")
    return "-".join(p for p in parts if p not in ("fe0f", "fe0e"))


def split_skin_tone(name: str, visible: set[str]) -> tuple[str, str] | None:
    """Return (base name, tone phrase) if `name` is a skin-tone variant of a
    visible base icon, else None."""
    for suffix, phrase in SKIN_TONE_SUFFIXES.items():
        if name.endswith("-" + suffix):
            base = name[: -len(suffix) - 1]
            if base in visible:
                return base, phrase
    return None


class Emojibase:
    """Index of emojibase entries by codepoints and by normalised label."""

    def __init__(self, data: list, messages: dict):
        self.by_hex: dict[str, dict] = {}
        self.by_label: dict[str, dict] = {}
        groups = {g["order"]: g["message"] for g in messages.get("groups", [])}
        for entry in data:
            info = {
                "label": entry["label"],
                "tags": list(entry.get("tags", [])),
                "emoji": entry.get("emoji", ""),
                "hexcode": entry["hexcode"],
                "group": groups.get(entry.get("group")),
            }
            self._add(info)
            for skin in entry.get("skins", []):
                # Skin entries carry no tags; inherit the base entry's.
                self._add(dict(info, label=skin["label"], emoji=skin.get("emoji", ""),
                               hexcode=skin["hexcode"]))

    def _add(self, info: dict) -> None:
        self.by_hex.setdefault(hex_key(info["hexcode"]), info)
        self.by_label.setdefault(name_key(info["label"]), info)

    def match(self, hexcodes: list[str], name: str) -> tuple[dict | None, str]:
        for code in hexcodes:
            info = self.by_hex.get(hex_key(code))
            if info is not None:
                return info, "codepoints"
        info = self.by_label.get(name_key(name))
        if info is not None:
            return info, "label"
        return None, "none"


def make_caption(name: str, label: str | None) -> str:
    """Readable caption: the Iconify name with hyphens as spaces, or the CLDR
    label (ASCII-folded, hyphens as spaces) when the name is just that label
    with apostrophes or non-ASCII letters dropped, so "piata" -> "pinata" and
    "mans-shoe" -> "man's shoe"."""
    if label:
        def strict_key(text: str) -> str:
            # Unlike name_key(), keep punctuation other than apostrophes, so
            # "keycap: 5" or "a button (blood type)" do not qualify.
            return re.sub(r"[\s-]+", "-", text.lower().replace("'", ""))

        folded = ascii_fold(label)
        dropped = "".join(  # Iconify drops non-ASCII letters: "piñata" -> "piata"
            ch for ch in label.replace("\u2019", "'")
            if ch.isascii() or not unicodedata.category(ch).startswith("L")
        )
        if name in (strict_key(folded), strict_key(dropped)):
            return re.sub(r"[\s-]+", " ", folded.lower()).strip()
    return name.replace("-", " ")


def unique(items):
    seen = set()
    out = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


# --------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------


def select_icons(icon_set: dict, chars: dict, skin_tones: bool):
    """Return sorted (name, hexcodes, skin) tuples for the icons to write,
    plus counters of what was skipped and why."""
    icons = icon_set["icons"]
    aliases = icon_set.get("aliases", {})
    hex_by_name: dict[str, list[str]] = {}
    for code, name in chars.items():
        hex_by_name.setdefault(name, []).append(code)

    skipped = {"hidden": 0, "alias_duplicate": 0, "skin_tone": 0}
    candidates = []
    for name, data in icons.items():
        if data.get("hidden"):
            skipped["hidden"] += 1
            continue
        candidates.append(name)
    for name, data in aliases.items():
        if not any(data.get(k) for k in ("hFlip", "vFlip", "rotate")):
            skipped["alias_duplicate"] += 1
            continue
        candidates.append(name)

    visible = set(candidates)
    chosen = []
    for name in sorted(candidates):
        codes = sorted(hex_by_name.get(name, []))
        has_tone_cp = any(p in SKIN_TONE_CODEPOINTS for c in codes for p in hex_key(c).split("-"))
        tone = split_skin_tone(name, visible)
        is_skin = has_tone_cp or (not codes and tone is not None)
        if is_skin and not skin_tones:
            skipped["skin_tone"] += 1
            continue
        chosen.append((name, codes, tone if is_skin else None))
    return chosen, skipped


def category_lookup(metadata: dict, icon_set: dict):
    by_name = {}
    for category, names in sorted(metadata.get("categories", {}).items()):
        for name in names:
            by_name.setdefault(name, category)

    def lookup(name: str) -> str | None:
        if name in by_name:
            return by_name[name]
        # Aliases inherit the category of their parent.
        alias = icon_set.get("aliases", {}).get(name)
        return lookup(alias["parent"]) if alias else None

    return lookup


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / "metadata.jsonl").is_file() and not force:
            sys.exit(f"error: {out} is not empty and holds no previous dataset; "
                     "use --force to write into it anyway")
    out.mkdir(parents=True, exist_ok=True)


def remove_stale(out: Path, written: set[str]) -> int:
    """Remove .svg/.txt files of a previous run that this run did not write."""
    removed = 0
    for path in sorted(out.iterdir()):
        if path.suffix in (".svg", ".txt") and path.is_file() and path.name not in written:
            path.unlink()
            removed += 1
    return removed


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def notice_text(fluent: Package, emojibase: Package, info: dict) -> str:
    author = info.get("author", {})
    return f"""\
diffctl emoji training set
==========================

Generated by tools/emoji/build_dataset.py in the diffctl repository from two
npm packages, downloaded from the npm registry and verified against pinned
sha512 hashes.

Artwork: {fluent.spec}
  Microsoft Fluent Emoji, flat style ({info.get('name', 'Fluent Emoji Flat')}),
  packaged in Iconify JSON format by the Iconify project.
  Author:   {author.get('name', 'Microsoft Corporation')} ({author.get('url', '')})
  Licence:  MIT, see LICENSE-fluent-emoji.txt. The npm package ships no
            licence file; the text is that of {FLUENT_LICENSE_URL}.
  Tarball:  {fluent.tarball_url}
  Integrity: {fluent.integrity}
  Each .svg is the icon's Iconify "body" wrapped in an <svg> element with the
  icon's view box; mirrored aliases have the flip applied. Artwork unchanged.

Keywords: {emojibase.spec}
  Emoji labels and tags by Emojibase (https://emojibase.dev), derived from
  Unicode CLDR annotations.
  Licence:  MIT, see LICENSE-emojibase.txt (copied from the package).
  Tarball:  {emojibase.tarball_url}
  Integrity: {emojibase.integrity}

Captions (.txt, metadata.jsonl "text") are the Fluent icon names with hyphens
replaced by spaces (or the CLDR label where it only adds apostrophes or
diacritics). metadata.jsonl "keywords" combine the emojibase label and tags
with the Iconify category.
"""


def build(args: argparse.Namespace) -> int:
    cache = Path(os.path.expanduser(args.cache))
    out = Path(args.out)
    registry = args.registry.rstrip("/")

    fluent = Package(FLUENT_PACKAGE, FLUENT_VERSION, FLUENT_INTEGRITY, FLUENT_SHASUM)
    emojibase = Package(EMOJIBASE_PACKAGE, EMOJIBASE_VERSION, EMOJIBASE_INTEGRITY,
                        EMOJIBASE_SHASUM)
    for pkg in (fluent, emojibase):
        pkg.fetch(registry, cache)

    icon_set = fluent.read_json("icons.json")
    chars = fluent.read_json("chars.json")
    metadata = fluent.read_json("metadata.json")
    info = fluent.read_json("info.json")
    eb = Emojibase(emojibase.read_json("en/data.json"), emojibase.read_json("en/messages.json"))
    category_of = category_lookup(metadata, icon_set)

    chosen, skipped = select_icons(icon_set, chars, args.skin_tones)
    total_selected = len(chosen)
    if args.limit is not None:
        chosen = chosen[: args.limit]

    prepare_out_dir(out, args.force)
    records = []
    written: set[str] = set()
    xml_failures = []
    match_kinds = {"codepoints": 0, "label": 0, "none": 0}
    unmatched = []
    categories = set()
    for name, codes, tone in chosen:
        icon = resolve_icon(icon_set, name)
        svg = icon_to_svg(icon)
        try:
            root = ET.fromstring(svg)
            if root.tag != f"{{{SVG_NS}}}svg":
                raise ValueError(f"root element is {root.tag}")
        except (ET.ParseError, ValueError) as err:
            xml_failures.append((name, str(err)))

        entry, how = eb.match(codes, name)
        if entry is None and tone is not None:
            # e.g. a mirrored skin-tone alias: "<base>: <tone> skin tone".
            entry, how = eb.match([], f"{tone[0]} {tone[1]}")
        match_kinds[how] += 1
        if entry is None:
            unmatched.append(name)

        if tone is not None:
            base_entry, _ = eb.match([], tone[0])
            base_label = base_entry["label"] if base_entry else None
            caption = f"{make_caption(tone[0], base_label)}, {tone[1]}"
        else:
            caption = make_caption(name, entry["label"] if entry else None)

        category = category_of(name) or category_of(tone[0] if tone else name)
        if category:
            categories.add(category)
        keywords = []
        if entry:
            keywords.append(ascii_fold(entry["label"]).lower())
            keywords.extend(entry["tags"])
        if category:
            keywords.append(category.lower())
        # ASCII only: symbol tags such as "×" or "♪" are dropped.
        keywords = [k for k in unique(ascii_fold(k) for k in keywords)
                    if k != caption and k.isascii()]

        write_text(out / f"{name}.svg", svg)
        write_text(out / f"{name}.txt", caption + "\n")
        written.update({f"{name}.svg", f"{name}.txt"})
        records.append({
            "file_name": f"{name}.svg",
            "text": caption,
            "keywords": keywords,
            "category": category,
            "emoji": entry["emoji"] if entry else None,
            "hexcode": entry["hexcode"] if entry else None,
            "name": name,
        })

    with open(out / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    write_text(out / "LICENSE-fluent-emoji.txt", FLUENT_LICENSE_TEXT)
    write_text(out / "LICENSE-emojibase.txt", emojibase.read("LICENSE").decode("utf-8"))
    write_text(out / "NOTICE.txt", notice_text(fluent, emojibase, info))
    written.update({"LICENSE-fluent-emoji.txt", "LICENSE-emojibase.txt", "NOTICE.txt"})
    stale = remove_stale(out, written)

    n = len(records)
    matched = n - match_kinds["none"]
    print(f"output:            {out}")
    print(f"sources:           {fluent.spec}, {emojibase.spec}")
    print(f"icons in set:      {len(icon_set['icons'])} (+{len(icon_set.get('aliases', {}))} aliases)")
    skins = ("skin-tone variants included" if args.skin_tones else
             f"{skipped['skin_tone']} skin-tone variants (use --skin-tones to include)")
    print(f"skipped:           {skipped['hidden']} hidden, {skipped['alias_duplicate']} duplicate "
          f"aliases, {skins}")
    if args.limit is not None:
        print(f"limit:             first {n} of {total_selected}")
    print(f"icons written:     {n}")
    pct = 100.0 * matched / n if n else 0.0
    print(f"emojibase matches: {matched}/{n} ({pct:.1f}%; {match_kinds['codepoints']} by "
          f"codepoints, {match_kinds['label']} by label)")
    if unmatched:
        print(f"  unmatched:       {', '.join(unmatched)}")
    print(f"categories:        {len(categories)} ({', '.join(sorted(categories))})")
    if stale:
        print(f"removed stale:     {stale} files from a previous run")
    if xml_failures:
        print(f"XML parse failures: {len(xml_failures)}")
        for name, err in xml_failures:
            print(f"  {name}: {err}")
        return 1
    print(f"XML check:         all {n} SVGs parse")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build diffctl's emoji image-caption dataset from pinned npm packages.")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help=f"download cache folder (default: {DEFAULT_CACHE})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="write only the first N icons (sorted by name)")
    parser.add_argument("--skin-tones", action=argparse.BooleanOptionalAction, default=False,
                        help="include skin-tone variants (default: --no-skin-tones)")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY,
                        help=f"npm registry base URL (default: {DEFAULT_REGISTRY})")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder that holds no previous dataset")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
