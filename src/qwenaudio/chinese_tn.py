"""The Chinese text normalisation the Qwen2-Audio ASR scoring applies to Chinese references and replies.

The official evaluate_asr.py (QwenLM/Qwen2-Audio eval_audio/) normalises Chinese with `cn_tn.TextNorm`, a copy of
speechio's chinese_text_normalization, built with every option off. What runs then is two steps: `normalize_nsw`
spells out "non-standard words" (dates, money, phone numbers, fractions, percentages, numbers before a measure word,
long digit strings, other numbers) in Chinese characters, then every Chinese or ASCII punctuation mark becomes a
space. This module is those two steps, written for that one use: the number system is the "mid" one (万, 亿 = 10^8,
兆 = 10^12, ...), output is simplified Chinese, and the quirks that decide scores are kept (each rule rewrites the
first occurrence of each match anywhere in the text, long digit strings are read digit by digit, 10-19 drop their
leading 一, a lone 2 before 百/千/万/亿... is 两). tests/test_scoring_qwen2.py checks it against the official code's
outputs (tests/golden/qwen2_scoring_official.json).
"""

from __future__ import annotations

import re
import string

DIGITS = "零一二三四五六七八九"
# (power of ten, character), largest first: the "mid" system's 十 百 千 万, then 亿 and each larger unit 10^4 apart.
UNITS = sorted([(1, "十"), (2, "百"), (3, "千"), (4, "万")] +
               [((i + 2) * 4, c) for i, c in enumerate("亿兆京垓秭穰沟涧正载")], reverse=True)
POINT = "点"
LIANG = "两"  # 2 before a unit of 百 or more, where no 十 precedes it

CURRENCY_UNITS = "((亿|千万|百万|万|千|百)|(亿|千万|百万|万|千|百|)元|(亿|千万|百万|万|千|百|)块|角|毛|分)"
MEASURE_WORDS = (  # the measure words after which a number is read as a quantity
    "(匹|张|座|回|场|尾|条|个|首|阙|阵|网|炮|顶|丘|棵|只|支|袭|辆|挑|担|颗|壳|窠|曲|墙|群|腔|砣|座|客|贯|扎|捆|刀|令|打|"
    "手|罗|坡|山|岭|江|溪|钟|队|单|双|对|出|口|头|脚|板|跳|枝|件|贴|针|线|管|名|位|身|堂|课|本|页|家|户|层|丝|毫|厘|分|钱|"
    "两|斤|担|铢|石|钧|锱|忽|(千|毫|微)克|毫|厘|分|寸|尺|丈|里|寻|常|铺|程|(千|分|厘|毫|微)米|撮|勺|合|升|斗|石|盘|碗|碟|"
    "叠|桶|笼|盆|盒|杯|钟|斛|锅|簋|篮|盘|桶|罐|瓶|壶|卮|盏|箩|箱|煲|啖|袋|钵|年|月|日|季|刻|时|周|天|秒|分|旬|纪|岁|世|更|"
    "夜|春|夏|秋|冬|代|伏|辈|丸|泡|粒|颗|幢|堆|条|根|支|道|面|片|张|颗|块)")
# Chinese punctuation (as the Zhon project lists it) and ASCII punctuation: each becomes a space.
CHINESE_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
                       "〰〾〿–—‘’‛“”„‟…‧﹏·〈〉-")
TO_SPACES = str.maketrans(dict.fromkeys(CHINESE_PUNCTUATION + string.punctuation, " "))

NUMBER = r"(\d+(\.\d+)?)"
RULES = (  # (pattern whose group 1 is rewritten, how): in this order
    (r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)", "date"),
    (rf"\D+({NUMBER}[多余几]?{CURRENCY_UNITS}(\d{CURRENCY_UNITS}?)?)", "money"),
    (r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D", "mobile"),
    (r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D", "landline"),
    (r"(\d+/\d+)", "fraction"),
    (r"(\d+(\.\d+)?%)", "percentage"),
    (rf"{NUMBER}[多余几]?{MEASURE_WORDS}", "number"),
    (r"(\d{4,32})", "digits"),
    (NUMBER, "number"),
)
LETTERS_TWO_LETTERS = re.compile(r"(([a-zA-Z]+)二([a-zA-Z]+))")  # P2P, B2B: their 2 was spelled 二 by the rules


def spell(number: str, *, liang: bool = True, units: bool = True) -> str:
    """A decimal number ("3025", "0.5") in Chinese characters: with `units` as a quantity (三千零二十五, 零点五),
    else digit by digit (三零二五). `liang`: a 2 heading 百 or a larger unit is 两 (两百, 两万)."""
    whole, _, fraction = number.partition(".")
    symbols = _grouped(whole) if units and len(whole) > 1 else [(int(c), DIGITS[int(c)]) for c in whole]
    if fraction:
        symbols += [(None, POINT)] + [(int(c), DIGITS[int(c)]) for c in fraction]
    if liang:
        symbols = _liang(symbols)
    text = "".join(char for _, char in symbols)
    if text.startswith(POINT):
        text = DIGITS[0] + text
    return text[1:] if text[:2] == "一十" else text  # 10-19: 十二, not 一十二


def _grouped(value: str) -> list[tuple[int | None, str]]:
    """(digit, char) and (-power, char) symbols of an integer, read with units: the largest unit below the
    number's length splits it in two, each read the same way; a zero run before a digit is read as one 零."""
    significant = value.lstrip("0")
    if not significant:
        return []
    if len(significant) == 1:
        zero = [(0, DIGITS[0])] if len(significant) != len(value) else []
        return zero + [(int(significant), DIGITS[int(significant)])]
    power, unit = next(u for u in UNITS if u[0] < len(significant))
    return _grouped(value[:-power]) + [(-power, unit)] + _grouped(significant[-power:])


def _liang(symbols: list[tuple[int | None, str]]) -> list[tuple[int | None, str]]:
    """A 2 followed by a unit other than 十, and preceded by nothing or a unit other than 十, is read 两."""
    def unit(i: int) -> bool:  # symbol i is a unit (units carry their power negated)
        return 0 <= i < len(symbols) and symbols[i][0] is not None and symbols[i][0] < 0

    out = list(symbols)
    for i, (value, _) in enumerate(symbols):
        before = i == 0 or unit(i - 1) and symbols[i - 1][0] != -1
        if value == 2 and unit(i + 1) and symbols[i + 1][0] != -1 and before:
            out[i] = (2, LIANG)
    return out


def _date(text: str) -> str:
    """"2020年3月5日" as 二零二零年三月五日: the year digit by digit, month and day as numbers. The rule's match
    may be empty, or hold only a year, only a month, or a month and day."""
    year, has_year, rest = text.partition("年")
    if not has_year:
        year, rest = "", text
    else:
        year = spell(year, liang=False, units=False) + "年"
    month, has_month, day = rest.partition("月")
    if not has_month:
        return year
    return year + spell(month) + "月" + (spell(day[:-1]) + day[-1] if day else "")


def _money(text: str) -> str:
    for number, _ in re.findall(NUMBER, text):
        text = text.replace(number, spell(number))  # every occurrence, one number after the other
    return text


REWRITES = {
    "date": _date,
    "money": _money,
    "mobile": lambda t: "".join(spell(p, liang=False, units=False) for p in t.strip("+").split()),
    "landline": lambda t: "".join(spell(p, liang=False, units=False) for p in t.split("-")),
    "fraction": lambda t: spell(t.split("/")[1]) + "分之" + spell(t.split("/")[0]),
    "percentage": lambda t: "百分之" + spell(t.strip().strip("%")),
    "number": spell,
    "digits": lambda t: spell(t, liang=False, units=False),
}
COMPILED = [(re.compile(pattern), kind) for pattern, kind in RULES]


def normalize_nsw(text: str) -> str:
    """`text` with its numbers spelled out, rule by rule (RULES); each match's first occurrence anywhere in the text
    is rewritten, as the official code does with `str.replace(match, new, 1)`. The text is framed by "^" and "$"
    so that the rules needing a non-digit before or after a number match at its ends; every "^" and "$" at either
    end is stripped afterwards, the text's own included."""
    text = f"^{text}$"
    for pattern, kind in COMPILED:
        if kind == "percentage":
            text = text.replace("％", "%")  # the full-width sign too
        for match in [m.group(1) for m in pattern.finditer(text)]:
            text = text.replace(match, REWRITES[kind](match), 1)
    for whole, left, right in LETTERS_TWO_LETTERS.findall(text):
        text = text.replace(whole, f"{left}2{right}", 1)
    return text.lstrip("^").rstrip("$")


def normalize(text: str) -> str:
    """The official `TextNorm(...)` call evaluate_asr.py makes on Chinese: numbers spelled out, punctuation to
    spaces."""
    return normalize_nsw(text).translate(TO_SPACES)
