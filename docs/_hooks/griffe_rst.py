"""Griffe extension: turn the reStructuredText habits of memrl's docstrings into Markdown.

memrl's docstrings are prose written for ``help()`` and Sphinx: ``literals``, roles such as
:func:`name` or :class:`~pkg.Class`, ``::`` literal blocks and ``>>>`` examples. mkdocstrings
renders docstrings as Markdown, so before rendering this extension rewrites, outside code:

- ``>>>`` examples into fenced ``pycon`` blocks, and ``::`` literal blocks into fenced blocks;
- roles into code spans (``~`` keeps the last component, as Sphinx shows it);
- ``<word>`` placeholders into text (Markdown would pass them through as unknown HTML tags);
- ``name*.png`` globs and underscores outside words (``o'_0 ... a_{k+1}``) into text:
  Markdown would read them as emphasis, and ``{...}`` after it as an attribute list.

Only the rendered docs change; the source docstrings stay as they are.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const|ref):`(~?)([^`]+)`")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
_TAG_LIKE = re.compile(r"<(?=[A-Za-z/])")
_GLOB_STAR = re.compile(r"(?<=\w)\*(?=\.\w)")
_LOOSE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9_\\])_|_(?![A-Za-z0-9_])")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_blocks(text: str) -> str:
    """``>>>`` examples and ``::`` literal blocks as fenced code blocks."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            pad = " " * _indent(line)
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(pad) :] if lines[i].startswith(pad) else lines[i].strip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [pad + "```pycon", *(pad + b for b in block), pad + "```", ""]
            continue
        if line.rstrip().endswith("::"):
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j > i + 1 and j < len(lines) and _indent(lines[j]) > base:
                body_indent = _indent(lines[j])
                end = j
                while end < len(lines) and (
                    not lines[end].strip() or _indent(lines[end]) >= body_indent
                ):
                    end += 1
                while end > j and not lines[end - 1].strip():
                    end -= 1
                head = line.rstrip()[:-2].rstrip()
                if head.strip():
                    out.append(head + ":")
                pad = " " * base
                out += ["", pad + "```text"]
                out += [pad + body[body_indent:] for body in lines[j:end]]
                out += [pad + "```", ""]
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _prose(segment: str) -> str:
    segment = _LOOSE_UNDERSCORE.sub(r"\\_", segment)
    return _GLOB_STAR.sub(r"\\*", _TAG_LIKE.sub("&lt;", segment))


def _inline(text: str) -> str:
    """Roles to code spans; placeholders and globs escaped outside code spans and fences."""
    text = _ROLE.sub(lambda m: "`" + (m[2].rsplit(".", 1)[-1] if m[1] else m[2]) + "`", text)
    parts = re.split(r"(^[ \t]*```.*?^[ \t]*```[ \t]*$)", text, flags=re.DOTALL | re.MULTILINE)
    for k, part in enumerate(parts):
        if k % 2:  # a fenced block
            continue
        pieces, last = [], 0
        for span in _CODE_SPAN.finditer(part):
            pieces += [_prose(part[last : span.start()]), span.group(0)]
            last = span.end()
        pieces.append(_prose(part[last:]))
        parts[k] = "".join(pieces)
    return "".join(parts)


def rst_to_markdown(text: str) -> str:
    return _inline(_fence_blocks(text))


class RstDocstrings(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
