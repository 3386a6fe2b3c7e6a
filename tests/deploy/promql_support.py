"""A small PromQL reader for the deployment tests: the series selectors of an expression (metric
name and label matchers) and the labels it groups by, without evaluating anything.

It understands what dashboards and alerting rules use: functions and aggregations, ``by`` /
``without`` / ``on`` / ``ignoring`` / ``group_left`` / ``group_right`` label lists, label
matchers, range and subquery brackets, numbers, durations, strings, comments and Grafana's
``$variables``. Anything else is a ``PromQLError``, as are unknown functions and unbalanced
brackets, so a typo fails rather than passing as a metric name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio"})
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing",
    "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase",
    "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year", "start", "end"})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})

# Grafana's built-in interval variables, replaced by durations before parsing.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION = re.compile(r"(?:\d+(?:ms|[smhdwy]))+")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_OPERATORS = ("==", "!=", ">=", "<=", "=~", "!~", "+", "-", "*", "/", "%", "^", ">", "<", ",", "@")
_MATCH_OPS = ("=~", "!~", "!=", "=")


class PromQLError(ValueError):
    pass


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass
class Selector:
    metric: str
    matchers: list[Matcher] = field(default_factory=list)


@dataclass
class Parsed:
    selectors: list[Selector]
    grouping: set[str]  # labels named in by/without/on/ignoring/group_left/group_right lists
    aggregations: set[str]  # aggregation operators used (sum, count, ...)

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def substitute_grafana(expr: str) -> str:
    for name, duration in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, duration)
    return expr


def parse(expr: str) -> Parsed:
    """The selectors and grouping labels of ``expr``; raises ``PromQLError`` on what it cannot read."""
    text = substitute_grafana(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    aggregations: set[str] = set()
    depth = 0
    i, n = 0, len(text)
    last_metric: Selector | None = None  # the selector a following {...} belongs to
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "\"'`":
            _, i = _string(text, i)
            last_metric = None
            continue
        if ch == "{":
            matchers, i = _matchers(text, i)
            if last_metric is None:
                raise PromQLError(f"a selector without a metric name at {i} in {expr!r}")
            last_metric.matchers.extend(matchers)
            last_metric = None
            continue
        if ch == "[":
            end = text.find("]", i)
            if end < 0:
                raise PromQLError(f"unclosed '[' in {expr!r}")
            body = text[i + 1:end]
            if not re.fullmatch(r"\s*(?:\d+(?:ms|[smhdwy]))+\s*(?::\s*(?:(?:\d+(?:ms|[smhdwy]))+)?\s*)?", body):
                raise PromQLError(f"not a range or subquery: [{body}] in {expr!r}")
            i = end + 1
            last_metric = None
            continue
        if ch == "(":
            depth += 1
            i += 1
            last_metric = None
            continue
        if ch == ")":
            depth -= 1
            if depth < 0:
                raise PromQLError(f"unbalanced ')' in {expr!r}")
            i += 1
            last_metric = None
            continue
        if ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _DURATION.match(text, i) or _NUMBER.match(text, i)
            i = m.end()
            last_metric = None
            continue
        m = _IDENT.match(text, i)
        if m:
            word = m.group()
            i = m.end()
            last_metric = None
            following = _next_char(text, i)
            if word in GROUPING:
                if following == "(":
                    labels, i = _label_list(text, text.index("(", i))
                    grouping |= labels
                continue
            if word in AGGREGATIONS:
                aggregations.add(word)
                continue
            if word in KEYWORDS:
                continue
            if following == "(":
                if word not in FUNCTIONS:
                    raise PromQLError(f"unknown function {word}() in {expr!r}")
                continue
            last_metric = Selector(word)
            selectors.append(last_metric)
            continue
        op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
        if op is None:
            raise PromQLError(f"unexpected {ch!r} at {i} in {expr!r}")
        i += len(op)
        last_metric = None
    if depth:
        raise PromQLError(f"unbalanced '(' in {expr!r}")
    if not selectors:
        raise PromQLError(f"no metric in {expr!r}")
    return Parsed(selectors, grouping, aggregations)


def _next_char(text: str, i: int) -> str:
    while i < len(text) and text[i].isspace():
        i += 1
    return text[i] if i < len(text) else ""


def _string(text: str, i: int) -> tuple[str, int]:
    quote, j, out = text[i], i + 1, []
    while j < len(text):
        c = text[j]
        if c == "\\" and quote != "`":
            out.append(text[j:j + 2])
            j += 2
            continue
        if c == quote:
            return "".join(out), j + 1
        out.append(c)
        j += 1
    raise PromQLError(f"unterminated string in {text!r}")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _matchers(text: str, i: int) -> tuple[list[Matcher], int]:
    """Label matchers from the '{' at ``i``; returns them and the index after '}'."""
    out: list[Matcher] = []
    i = _skip_space(text, i + 1)
    while True:
        if i < len(text) and text[i] == "}":
            return out, i + 1
        m = _LABEL.match(text, i)
        if not m:
            raise PromQLError(f"bad label matcher at {i} in {text!r}")
        i = _skip_space(text, m.end())
        op = next((o for o in _MATCH_OPS if text.startswith(o, i)), None)
        if op is None:
            raise PromQLError(f"bad matcher operator at {i} in {text!r}")
        i = _skip_space(text, i + len(op))
        if i >= len(text) or text[i] not in "\"'`":
            raise PromQLError(f"label matcher value must be a string at {i} in {text!r}")
        value, i = _string(text, i)
        out.append(Matcher(m.group(), op, value))
        i = _skip_space(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_space(text, i + 1)
        elif i < len(text) and text[i] != "}":
            raise PromQLError(f"expected ',' or '}}' at {i} in {text!r}")


def _label_list(text: str, i: int) -> tuple[set[str], int]:
    """Labels of the '(' at ``i`` (a by/on/... list); returns them and the index after ')'."""
    end = text.find(")", i)
    if end < 0:
        raise PromQLError(f"unclosed label list in {text!r}")
    labels = {part.strip() for part in text[i + 1:end].split(",") if part.strip()}
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise PromQLError(f"bad label {label!r} in {text!r}")
    return labels, end + 1


def literal_alternatives(value: str) -> list[str] | None:
    """The strings a matcher value stands for when it is a plain `a|b|c` alternation of literals
    (Grafana variables and regular expressions give None: nothing to check)."""
    if "$" in value or re.search(r"[\\.*+?()\[\]^]", value):
        return None
    return value.split("|")
