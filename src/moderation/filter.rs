//! Keyword filters on client chat text (PROTOCOL.md v1.1, *Moderation*): a `block` word
//! refuses a chat (`filtered`), a `mask` word has it broadcast with the word as `*`s.
//!
//! Shape (why it is so):
//! - **The automaton is built off the hot path.** [`Filter::new`] normalizes both lists
//!   and compiles them into one Aho-Corasick automaton, once per change of the lists (a
//!   tenth of a second for ten thousand words); the owner ([`super::Moderation`]) builds
//!   it on a blocking thread and swaps it in atomically behind an `Arc`. A chat only
//!   loads the current filter and runs [`Filter::check`]: no lock, one scan of the text,
//!   no allocation unless the text needs rewriting or a word matched.
//! - **The normalization is the protocol's**, applied the same way to the words and to
//!   the text: Unicode NFKC (full-width `ＢＡＤ` is `BAD`, `ﬁ` is `fi`, `①` is `1`) with
//!   the zero-width characters (U+200B, U+200C, U+200D, U+2060, U+FEFF) removed, then a
//!   per-character lowercase for matching. The full NFKC costs microseconds a chat, and
//!   almost every chat is NFKC already (ASCII, CJK, emoji), so a table of per-character
//!   facts, computed once per process, lets the hot path normalize and fold in one
//!   branch-free pass (or one lookup per character); only texts whose characters may
//!   compose or reorder pay for the full NFKC.
//! - **Masking writes the normalized text, matching reads the lowercased one.** Case is
//!   kept in what is broadcast, so every match is mapped back to the characters of the
//!   normalized text it covers: lowercasing may change the length (`İ` lowercases to two
//!   characters), and each normalized character covered becomes one `*`.
//! - **One automaton for both lists**, block words first: the common chat (no word) costs
//!   one scan, not two. Masking needs every occurrence of every mask word, overlapping
//!   ones included (`ab` and `bc` in `abc` mask all three), hence an overlapping search;
//!   a block word ends it at once, since block wins over mask.
//! - **A client's text cannot make it fail**: `check` has no error path. Only building
//!   (the operator's lists, of absurd size) can fail, as [`FilterError`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use unicode_normalization::char::canonical_combining_class;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfkc_quick};

/// Above this size (estimated before building), the automaton is a contiguous NFA rather
/// than a DFA. The DFA scans about a third faster, which the hot-path budget needs (2 µs
/// for a 200-character chat against 10,000 words, whose DFA takes ~50 MiB), but it grows
/// with the words times the distinct bytes they use; larger lists get the NFA, some
/// thirty times smaller.
const DFA_MAX_BYTES: usize = 64 << 20;

/// The characters the protocol removes before matching: invisible, so a client could put
/// them inside a word (`b\u{200B}ad`) to dodge the filter.
fn is_zero_width(c: char) -> bool {
    matches!(
        c,
        '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}'
    )
}

/// NFKC-normalizes `text` and removes the zero-width characters (no case folding).
///
/// The zero-width characters are removed before NFKC as well as after: removed only
/// after, one between a letter and a combining accent (`e\u{200B}\u{301}`) would keep
/// the two from composing, and the result (`e\u{301}`) would not match a word written
/// `é`. Removed first, the result is NFKC itself, so normalizing is idempotent.
pub fn normalize(text: &str) -> String {
    if is_nfkc_quick(text.chars()) == IsNormalized::Yes && !text.chars().any(is_zero_width) {
        return text.to_owned();
    }
    text.chars()
        .filter(|&c| !is_zero_width(c))
        .nfkc()
        // No character's NFKC form holds a zero-width one today; this keeps the promise
        // should a later Unicode version differ.
        .filter(|&c| !is_zero_width(c))
        .collect()
}

/// The lowercase form of `c` that matching compares.
///
/// `char::to_lowercase` alone is not case-insensitive for Greek: `Σ` lowercases to `σ`,
/// but a word ends in `ς` (`ΟΔΟΣ` is `οδος`), so the final sigma folds to `σ` too, as in
/// Unicode case folding. Both are two bytes in UTF-8.
fn fold_char(c: char) -> impl Iterator<Item = char> {
    c.to_lowercase().map(|l| if l == 'ς' { 'σ' } else { l })
}

/// `normalized` folded, character by character.
fn fold_all(normalized: &str) -> String {
    let mut out = String::with_capacity(normalized.len());
    for c in normalized.chars() {
        out.extend(fold_char(c));
    }
    out
}

/// What the hot path needs to know about a character (see [`Classes`]).
mod class {
    /// NFKC keeps it (quick check `Yes`, a starter), it is not zero-width, and it folds
    /// to itself.
    pub const KEEP: u8 = 0;
    /// As [`KEEP`], but it folds to something else (an upper-case letter).
    pub const FOLD: u8 = 1;
    /// A combining mark NFKC keeps if the marks before it, back to the last starter, are
    /// of no higher combining class (quick check `Yes`), and it folds to itself.
    pub const MARK: u8 = 2;
    /// Zero-width: removed.
    pub const DROP: u8 = 3;
    /// NFKC replaces it, whatever is around it, with starters it keeps (`Ａ`, `，`, `ﬁ`,
    /// `①`): see `Classes::replacements`.
    pub const REPLACE: u8 = 4;
    /// Anything else: NFKC may compose it with what precedes it, or decompose it into
    /// marks. The text takes the full normalization.
    pub const NORMALIZE: u8 = 5;
}

fn is_kept_starter(c: char) -> bool {
    !is_zero_width(c)
        && canonical_combining_class(c) == 0
        && is_nfkc_quick(std::iter::once(c)) == IsNormalized::Yes
}

fn classify(c: char) -> u8 {
    if is_zero_width(c) {
        return class::DROP;
    }
    let mut folded = fold_char(c);
    let folds_to_itself = folded.next() == Some(c) && folded.next().is_none();
    match is_nfkc_quick(std::iter::once(c)) {
        IsNormalized::Yes => match (canonical_combining_class(c), folds_to_itself) {
            (0, true) => class::KEEP,
            (0, false) => class::FOLD,
            (_, true) => class::MARK,
            (_, false) => class::NORMALIZE,
        },
        // Its NFKC form is made of starters that compose with nothing before them (quick
        // check `Yes`), so it is the same in any text (see `prepare_fast`). `Maybe`
        // characters may compose with the one before: never replaced alone.
        IsNormalized::No
            if std::iter::once(c).nfkc().next().is_some()
                && std::iter::once(c).nfkc().all(is_kept_starter) =>
        {
            class::REPLACE
        }
        _ => class::NORMALIZE,
    }
}

/// The class of every character, looked up in two steps (its block of 256 code points,
/// then the character): the quick check and the lowercase tables cost tens of
/// nanoseconds a character, which a 200-character chat cannot afford. Most blocks (CJK,
/// emoji, unassigned) are uniform, so the deduplicated table is small (~170 blocks,
/// 90 KiB, plus the replacements).
///
/// An entry holds the class in its low [`CLASS_BITS`] and, for [`class::REPLACE`], the
/// index of the replacement above them: a full-width comma costs a lookup, not a hash.
struct Classes {
    /// For each block of 256 code points, its index in `blocks`.
    index: Vec<u16>,
    blocks: Vec<[u16; 256]>,
    /// What each [`class::REPLACE`] character becomes: normalized, folded, and whether
    /// each of its characters folds to as many bytes (see [`Prepared::aligned`]).
    replacements: Vec<(Box<str>, Box<str>, bool)>,
}

const CLASS_BITS: u32 = 3;
const CLASS_MASK: u16 = (1 << CLASS_BITS) - 1;

/// Built by the first [`Filter::new`] (off the hot path), once per process (~60 ms).
static CLASSES: LazyLock<Classes> = LazyLock::new(Classes::build);

impl Classes {
    fn build() -> Classes {
        let mut seen: HashMap<[u16; 256], u16> = HashMap::new();
        let mut blocks = Vec::new();
        let mut replacements = Vec::new();
        let index = (0..=(u32::from(char::MAX) >> 8))
            .map(|high| {
                let mut block = [u16::from(class::NORMALIZE); 256];
                for (low, slot) in (0u32..).zip(block.iter_mut()) {
                    let Some(c) = char::from_u32(high << 8 | low) else {
                        continue;
                    };
                    let class = classify(c);
                    *slot = u16::from(class);
                    if class != class::REPLACE {
                        continue;
                    }
                    // ~4,800 today, room for 8,192; a character past them would take
                    // the full normalization.
                    match u16::try_from(replacements.len() << CLASS_BITS) {
                        Ok(at) => *slot |= at,
                        Err(_) => *slot = u16::from(class::NORMALIZE),
                    }
                    let normalized: String = std::iter::once(c).nfkc().collect();
                    let aligned = normalized
                        .chars()
                        .all(|n| fold_char(n).map(char::len_utf8).sum::<usize>() == n.len_utf8());
                    let folded = fold_all(&normalized);
                    replacements.push((normalized.into(), folded.into(), aligned));
                }
                *seen.entry(block).or_insert_with(|| {
                    blocks.push(block);
                    // At most 0x1100 blocks: it always fits (and were it not to, the
                    // lookup would find no block, and normalize).
                    u16::try_from(blocks.len() - 1).unwrap_or(u16::MAX)
                })
            })
            .collect();
        Classes {
            index,
            blocks,
            replacements,
        }
    }

    /// The entry of `c`: its class, and where it is a `REPLACE`, its replacement.
    #[inline]
    fn entry(&self, c: char) -> u16 {
        let cp = u32::from(c);
        self.index
            .get((cp >> 8) as usize)
            .and_then(|&b| self.blocks.get(usize::from(b)))
            .map_or(u16::from(class::NORMALIZE), |block| {
                block[usize::from(cp as u8)]
            })
    }

    #[inline]
    fn of(&self, c: char) -> u8 {
        (self.entry(c) & CLASS_MASK) as u8
    }

    /// Length in bytes of `c` folded.
    fn folded_len(&self, c: char) -> usize {
        match c {
            '\0'..='\x7f' => 1,
            _ => match self.of(c) {
                class::KEEP | class::MARK => c.len_utf8(),
                _ => fold_char(c).map(char::len_utf8).sum(),
            },
        }
    }
}

/// Whether `bytes` (UTF-8) holds only ASCII, CJK ideographs (U+4000..=U+9FFF) and
/// pictographic emoji (U+1F300..=U+1FAFF), characters NFKC keeps and that have no case
/// but ASCII's: `Some(has_upper_case)` then. Branch-free, so the compiler vectorizes it:
/// a typical chat needs no per-character work at all.
fn plain_text(bytes: &[u8]) -> Option<bool> {
    let lead_ok = |a: u8, b: u8, c: u8| {
        // ASCII or a continuation byte (judged with its lead).
        (a < 0xC0)
            | (0xE4..=0xE9).contains(&a)
            // F0 9F 8C..=AB: U+1F300..=U+1FAFF.
            | ((a == 0xF0) & (b == 0x9F) & (0x8C..=0xAB).contains(&c))
    };
    let (ok, upper) = bytes
        .iter()
        .zip(bytes.get(1..).unwrap_or_default())
        .zip(bytes.get(2..).unwrap_or_default())
        .fold((true, false), |(ok, upper), ((&a, &b), &c)| {
            (ok & lead_ok(a, b, c), upper | a.is_ascii_uppercase())
        });
    // The last two bytes start no three- or four-byte character (valid UTF-8); they may
    // be ASCII, or a two-byte character (not plain).
    let tail = bytes
        .get(bytes.len().saturating_sub(2)..)
        .unwrap_or_default();
    let tail_ok = tail.iter().all(|&a| a < 0xC0);
    let tail_upper = tail.iter().any(u8::is_ascii_uppercase);
    (ok & tail_ok).then_some(upper | tail_upper)
}

/// A copy of a text being rewritten, begun at its first change (most texts have none).
struct Rewrite<'a> {
    text: &'a str,
    buf: Option<String>,
    /// Bytes of `text` accounted for in `buf`.
    copied: usize,
}

impl<'a> Rewrite<'a> {
    fn new(text: &'a str) -> Self {
        Rewrite {
            text,
            buf: None,
            copied: 0,
        }
    }

    /// Replaces the `len` bytes of `text` at `at` (past those replaced so far) with what
    /// `with` writes; how many bytes it wrote.
    fn replace(&mut self, at: usize, len: usize, with: impl FnOnce(&mut String)) -> usize {
        let buf = self
            .buf
            .get_or_insert_with(|| String::with_capacity(self.text.len() + 16));
        buf.push_str(self.text.get(self.copied..at).unwrap_or_default());
        let before = buf.len();
        with(buf);
        self.copied = at + len;
        buf.len() - before
    }

    fn finish(self) -> Cow<'a, str> {
        match self.buf {
            None => Cow::Borrowed(self.text),
            Some(mut buf) => {
                buf.push_str(self.text.get(self.copied..).unwrap_or_default());
                Cow::Owned(buf)
            }
        }
    }
}

/// A chat text as the filter sees it.
struct Prepared<'a> {
    /// [`normalize`]d: what a masked chat is made of.
    normalized: Cow<'a, str>,
    /// `normalized` folded per character: what is matched.
    folded: Cow<'a, str>,
    /// Every character of `normalized` folds to as many bytes as it has, so byte offsets
    /// in `folded` are offsets in `normalized` (masking needs no walk to map them).
    aligned: bool,
}

fn prepare(text: &str) -> Prepared<'_> {
    prepare_fast(text, &CLASSES).unwrap_or_else(|| {
        let normalized = normalize(text);
        let folded = fold_all(&normalized);
        Prepared {
            normalized: Cow::Owned(normalized),
            folded: Cow::Owned(folded),
            aligned: false,
        }
    })
}

/// [`prepare`] in one pass, when the per-character facts suffice; `None` when the text
/// needs the full NFKC.
///
/// Why this equals [`normalize`]: with the zero-width characters dropped and each
/// `REPLACE` character replaced with its own NFKC form (which has the same compatibility
/// decomposition, so the text's NFKC is unchanged), what is left passes the NFKC quick
/// check (every character `Yes`, marks in canonical order), so it is its own NFKC.
fn prepare_fast<'a>(text: &'a str, classes: &Classes) -> Option<Prepared<'a>> {
    if let Some(upper) = plain_text(text.as_bytes()) {
        let folded = if upper {
            Cow::Owned(text.to_ascii_lowercase())
        } else {
            Cow::Borrowed(text)
        };
        return Some(Prepared {
            normalized: Cow::Borrowed(text),
            folded,
            aligned: true,
        });
    }
    let mut normalized = Rewrite::new(text);
    let mut folded = Rewrite::new(text);
    let mut aligned = true;
    // The highest combining class since the last starter, for the canonical-order rule.
    let mut last_cc = 0u8;
    for (at, c) in text.char_indices() {
        let len = c.len_utf8();
        let entry = match c {
            'A'..='Z' => u16::from(class::FOLD),
            '\0'..='\x7f' => u16::from(class::KEEP),
            _ => classes.entry(c),
        };
        match (entry & CLASS_MASK) as u8 {
            class::KEEP => last_cc = 0,
            class::FOLD => {
                last_cc = 0;
                let wrote = folded.replace(at, len, |b| b.extend(fold_char(c)));
                aligned &= wrote == len;
            }
            class::MARK => {
                let cc = canonical_combining_class(c);
                if cc < last_cc {
                    return None;
                }
                last_cc = cc;
            }
            // Gone before NFKC: the marks on either side meet.
            class::DROP => {
                normalized.replace(at, len, |_| {});
                folded.replace(at, len, |_| {});
            }
            class::REPLACE => {
                let replacement = usize::from(entry >> CLASS_BITS);
                let (n, f, replacement_aligned) = classes.replacements.get(replacement)?;
                last_cc = 0;
                normalized.replace(at, len, |b| b.push_str(n));
                folded.replace(at, len, |b| b.push_str(f));
                aligned &= *replacement_aligned;
            }
            _ => return None,
        }
    }
    Some(Prepared {
        normalized: normalized.finish(),
        folded: folded.finish(),
        aligned,
    })
}

/// A list as it is matched: each word normalized and folded, empty ones dropped, sorted,
/// without duplicates (`bad` and `ＢＡＤ` are one word).
fn prepare_list(words: &[String]) -> Vec<String> {
    let mut out: Vec<String> = words
        .iter()
        .map(|w| fold_all(&normalize(w)))
        .filter(|w| !w.is_empty())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The size of the DFA aho-corasick would build for `words`: one row per state of their
/// byte trie, each of as many 4-byte transitions as the smallest power of two at least
/// the number of byte classes (bytes the words tell apart).
fn dfa_bytes(words: &[&str]) -> usize {
    let mut sorted: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
    sorted.sort_unstable();
    // The root, plus the automaton's dead, fail and anchored start states.
    let mut states = 4usize;
    let mut prev: &[u8] = &[];
    let mut used = [false; 256];
    for w in &sorted {
        let common = prev
            .iter()
            .zip(w.iter())
            .take_while(|(a, b)| a == b)
            .count();
        states = states.saturating_add(w.len() - common);
        for &b in *w {
            used[usize::from(b)] = true;
        }
        prev = w;
    }
    // A used byte is a class of its own, and the unused bytes between two used ones one
    // more: class boundaries fall after each used byte and after the byte before it.
    let mut boundary = [false; 256];
    for (b, _) in used.iter().enumerate().filter(|(_, u)| **u) {
        boundary[b] = true;
        if b > 0 {
            boundary[b - 1] = true;
        }
    }
    let classes = boundary[..255].iter().filter(|&&x| x).count() + 1;
    states
        .saturating_mul(classes.next_power_of_two())
        .saturating_mul(4)
}

/// Why the lists did not build into a filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The automaton would exceed what aho-corasick can represent (its state or pattern
    /// identifiers overflow): only an absurd list gets there.
    #[error(
        "the filter lists ({block_words} block and {mask_words} mask words, {bytes} bytes normalized) do not build: {source}"
    )]
    Build {
        block_words: usize,
        mask_words: usize,
        bytes: usize,
        #[source]
        source: aho_corasick::BuildError,
    },
}

/// The compiled keyword lists.
///
/// Built once per change of the lists (off the hot path), shared behind an `Arc` and
/// swapped atomically by the caller.
#[derive(Clone, Default)]
pub struct Filter {
    /// Both lists: block words are the patterns below `block_words`, mask words the
    /// rest. `None`: no word at all.
    words: Option<AhoCorasick>,
    block_words: usize,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words = self.words.as_ref().map_or(0, AhoCorasick::patterns_len);
        f.debug_struct("Filter")
            .field("block_words", &self.block_words)
            .field("mask_words", &(words - self.block_words))
            .field("kind", &self.words.as_ref().map(AhoCorasick::kind))
            .finish()
    }
}

/// What a chat text becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No listed word: send the text as the client wrote it (unchanged, NOT normalized).
    Pass,
    /// A mask word matched: send this text instead (normalized, spans masked with '*').
    Masked(String),
    /// A block word matched: refuse the chat.
    Blocked,
}

impl Filter {
    /// Builds from the two lists (as given by the operator, not yet normalized).
    ///
    /// # Errors
    /// The lists are too large for an automaton ([`FilterError::Build`]).
    pub fn new(block: &[String], mask: &[String]) -> Result<Filter, FilterError> {
        let block = prepare_list(block);
        let mut mask = prepare_list(mask);
        // A word in both lists blocks; as a mask word too it would only be found twice.
        mask.retain(|w| block.binary_search(w).is_err());
        if block.is_empty() && mask.is_empty() {
            return Ok(Filter::empty());
        }
        // Here rather than in the first chat's check.
        LazyLock::force(&CLASSES);
        let words: Vec<&str> = block.iter().chain(&mask).map(String::as_str).collect();
        let build = |kind| {
            AhoCorasick::builder()
                // What an overlapping search (masking) needs.
                .match_kind(MatchKind::Standard)
                .kind(kind)
                .build(&words)
        };
        let built = if dfa_bytes(&words) <= DFA_MAX_BYTES {
            build(Some(AhoCorasickKind::DFA)).or_else(|_| build(None))
        } else {
            build(None)
        };
        let automaton = built.map_err(|source| FilterError::Build {
            block_words: block.len(),
            mask_words: mask.len(),
            bytes: words.iter().map(|w| w.len()).sum(),
            source,
        })?;
        Ok(Filter {
            words: Some(automaton),
            block_words: block.len(),
        })
    }

    /// An empty filter (no words): `check` is then a cheap no-op returning
    /// [`Verdict::Pass`] without normalizing.
    pub fn empty() -> Filter {
        Filter::default()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_none()
    }

    /// Checks one chat text.
    // Inlined, so that the empty filter's answer costs the caller a comparison, not a call
    // into the whole check.
    #[inline]
    pub fn check(&self, text: &str) -> Verdict {
        match &self.words {
            None => Verdict::Pass,
            Some(words) => self.check_words(words, text),
        }
    }

    fn check_words(&self, words: &AhoCorasick, text: &str) -> Verdict {
        let prepared = prepare(text);
        // Byte ranges of `folded`; allocated only once a mask word matched.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        // Overlapping search panics only on a leftmost match kind or an anchored
        // automaton; this one is `Standard` and unanchored, whatever the text.
        for m in words.find_overlapping_iter(prepared.folded.as_ref()) {
            if m.pattern().as_usize() < self.block_words {
                return Verdict::Blocked;
            }
            spans.push((m.start(), m.end()));
        }
        if spans.is_empty() {
            return Verdict::Pass;
        }
        spans.sort_unstable();
        Verdict::Masked(if prepared.aligned {
            mask_aligned(&prepared.normalized, &spans)
        } else {
            mask_mapped(&prepared.normalized, &spans, &CLASSES)
        })
    }
}

/// `normalized` with each character that a span covers replaced with one `*`. `spans`
/// are byte ranges of `normalized` itself (the folded text is aligned with it), sorted
/// by start.
fn mask_aligned(normalized: &str, spans: &[(usize, usize)]) -> String {
    let mut out = String::with_capacity(normalized.len());
    let mut copied = 0;
    for &(start, end) in spans {
        if end <= copied {
            continue;
        }
        // A match's ends are character boundaries of the folded text, and so of this one
        // (aligned); widening to whole characters is for safety's sake.
        let mut start = start.max(copied);
        while !normalized.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = end.min(normalized.len());
        while !normalized.is_char_boundary(end) {
            end += 1;
        }
        out.push_str(normalized.get(copied..start).unwrap_or_default());
        let covered = normalized
            .get(start..end)
            .unwrap_or_default()
            .chars()
            .count();
        out.extend(std::iter::repeat_n('*', covered));
        copied = end;
    }
    out.push_str(normalized.get(copied..).unwrap_or_default());
    out
}

/// [`mask_aligned`] where `spans` are byte ranges of `normalized` folded, whose lengths
/// differ: each character's folded bytes are walked to find the spans that cover it.
fn mask_mapped(normalized: &str, spans: &[(usize, usize)], classes: &Classes) -> String {
    let mut spans = spans.iter().peekable();
    let mut out = String::with_capacity(normalized.len());
    // The furthest end (exclusive) of the spans begun so far.
    let mut covered_to = 0;
    let mut folded_at = 0;
    for c in normalized.chars() {
        let folded_end = folded_at + classes.folded_len(c);
        // A span begun before this character's folded bytes end, and ending after they
        // begin, covers it (a word may cover part of `İ`'s two folded characters).
        while let Some(&&(start, end)) = spans.peek() {
            if start >= folded_end {
                break;
            }
            covered_to = covered_to.max(end);
            spans.next();
        }
        out.push(if covered_to > folded_at { '*' } else { c });
        folded_at = folded_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn words(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|w| (*w).to_owned()).collect()
    }

    fn filter(block: &[&str], mask: &[&str]) -> Filter {
        Filter::new(&words(block), &words(mask)).expect("small lists build")
    }

    fn masked(s: &str) -> Verdict {
        Verdict::Masked(s.to_owned())
    }

    #[test]
    fn matching_ignores_case() {
        let f = filter(&["bad", "плохо", "οδος"], &["dumb"]);
        for text in ["BAD", "so Bad!", "ПЛОХО", "очень Плохо", "ΟΔΟΣ", "η οδος"]
        {
            assert_eq!(f.check(text), Verdict::Blocked, "{text}");
        }
        // The case of the text is kept where it is not masked.
        assert_eq!(f.check("So DUMB, Dumb"), masked("So ****, ****"));
        assert_eq!(f.check("good"), Verdict::Pass);
    }

    #[test]
    fn greek_final_sigma_matches_either_way() {
        // A word written in capitals (σ) matches lower-case text ending in ς.
        let f = filter(&["ΟΔΟΣ"], &[]);
        assert_eq!(f.check("οδος"), Verdict::Blocked);
        assert_eq!(f.check("οδοσ"), Verdict::Blocked);
    }

    #[test]
    fn text_is_nfkc_normalized() {
        let f = filter(&["bad", "110", "fish"], &["evil"]);
        // Full-width Latin, the ligature ﬁ, circled, mathematical and superscript digits.
        for text in ["ＢＡＤ", "ｂａｄ", "①①⓪", "𝟏𝟏𝟎", "¹¹⁰", "ﬁsh", "ＦＩＳＨ"]
        {
            assert_eq!(f.check(text), Verdict::Blocked, "{text}");
        }
        // A masked chat is the normalized text: one `*` per normalized character.
        assert_eq!(f.check("ＥＶＩＬ！"), masked("****!"));
        // Half-width katakana composes with its voicing mark: the full NFKC.
        let f = filter(&["ガ"], &[]);
        assert_eq!(f.check("ｶﾞ"), Verdict::Blocked);
        // So do Hangul jamo.
        let f = filter(&["가"], &[]);
        assert_eq!(f.check("\u{1100}\u{1161}"), Verdict::Blocked);
    }

    #[test]
    fn zero_width_characters_are_removed() {
        let f = filter(&["bad"], &["ugly"]);
        for text in [
            "b\u{200B}ad",
            "b\u{200C}a\u{200D}d",
            "\u{2060}ba\u{FEFF}d",
            "Ｂ\u{200B}ＡＤ",
        ] {
            assert_eq!(f.check(text), Verdict::Blocked, "{text:?}");
        }
        assert_eq!(f.check("u\u{200B}gly!"), masked("****!"));
        // Removed before NFKC: the accent composes with its letter across it.
        let f = filter(&["café"], &[]);
        assert_eq!(f.check("cafe\u{200B}\u{301}"), Verdict::Blocked);
    }

    #[test]
    fn block_wins_over_mask() {
        let f = filter(&["kill"], &["bad"]);
        assert_eq!(f.check("bad bad kill"), Verdict::Blocked);
        assert_eq!(f.check("kill bad"), Verdict::Blocked);
        // A word in both lists blocks.
        let f = filter(&["bad"], &["bad", "ugly"]);
        assert_eq!(f.check("ugly bad"), Verdict::Blocked);
        assert_eq!(f.check("ugly"), masked("****"));
    }

    #[test]
    fn mask_replaces_each_character() {
        let f = filter(&[], &["傻瓜", "ab", "bc", "aba"]);
        assert_eq!(f.check("你是傻瓜吗"), masked("你是**吗"));
        assert_eq!(f.check("傻瓜傻瓜"), masked("****"));
        // Overlapping occurrences, of one word and of two.
        assert_eq!(f.check("abc"), masked("***"));
        assert_eq!(f.check("xababax"), masked("x*****x"));
        assert_eq!(f.check("a b c"), Verdict::Pass);
    }

    #[test]
    fn mask_maps_lowercase_that_changes_length() {
        // `İ` lowercases to `i` and a combining dot: two characters, three bytes, where
        // the text has one character of two bytes.
        let f = filter(&[], &["i̇x", "yz"]);
        assert_eq!(f.check("İx İX"), masked("** **"));
        assert_eq!(f.check("İİyz"), masked("İİ**"));
        // A word covering only part of `İ`'s lowercase still masks the whole character.
        let f = filter(&[], &["ai"]);
        assert_eq!(f.check("AİB"), masked("**B"));
        // Masking after a rewritten full-width prefix.
        let f = filter(&[], &["bad"]);
        assert_eq!(f.check("ＯＫ İ bad İ"), masked("OK İ *** İ"));
        // `Ⱥ` (two bytes) lowercases to three, `ẞ` (three) to two.
        let f = filter(&[], &["ⱥb", "ßc"]);
        assert_eq!(f.check("ȺȺBȺ ẞẞCẞ"), masked("Ⱥ**Ⱥ ẞ**ẞ"));
    }

    #[test]
    fn words_are_normalized() {
        let f = filter(&["ＢＡＤ", "b\u{200B}oo", "ﬁne"], &["Ｅｖｉｌ"]);
        assert_eq!(f.check("bad"), Verdict::Blocked);
        assert_eq!(f.check("boo"), Verdict::Blocked);
        assert_eq!(f.check("FINE"), Verdict::Blocked);
        assert_eq!(f.check("evil"), masked("****"));
        // Duplicates after normalization are one word.
        let f = filter(&["bad", "BAD", "ｂａｄ"], &[]);
        assert_eq!(f.block_words, 1, "{f:?}");
    }

    #[test]
    fn empty_words_are_ignored() {
        let f = filter(&["", "\u{200B}", "\u{FEFF}\u{2060}"], &[""]);
        assert!(f.is_empty());
        assert_eq!(f.check("anything"), Verdict::Pass);
        let f = filter(&["", "bad"], &["\u{200D}"]);
        assert!(!f.is_empty());
        assert_eq!(f.check("good"), Verdict::Pass);
        assert_eq!(f.check("bad"), Verdict::Blocked);
    }

    #[test]
    fn empty_filter_passes_everything() {
        for f in [Filter::empty(), Filter::default(), filter(&[], &[])] {
            assert!(f.is_empty());
            assert_eq!(f.check("ＢＡＤ b\u{200B}ad"), Verdict::Pass);
        }
    }

    #[test]
    fn pass_is_no_rewrite() {
        // The text would change under normalization, yet no word matches: `Pass`, and the
        // caller sends it as written.
        let f = filter(&["bad"], &["ugly"]);
        assert_eq!(f.check("ＨＥＬＬＯ ﬁne b\u{200B}ye"), Verdict::Pass);
    }

    #[test]
    fn emoji_words() {
        let f = filter(&["💩"], &["🍆🍑", "🐍"]);
        assert_eq!(f.check("you 💩!"), Verdict::Blocked);
        assert_eq!(f.check("nice 🍆🍑 lol"), masked("nice ** lol"));
        assert_eq!(f.check("🐍🐍"), masked("**"));
        // A ZWJ sequence: the joiner is removed, the emoji on either side stay.
        assert_eq!(f.check("👨\u{200D}🐍"), masked("👨*"));
        assert_eq!(f.check("🍆 🍑"), Verdict::Pass);
    }

    #[test]
    fn normalize_follows_the_protocol() {
        assert_eq!(normalize("ＢＡＤ"), "BAD");
        assert_eq!(normalize("ﬁ①"), "fi1");
        assert_eq!(
            normalize("b\u{200B}a\u{200C}d\u{200D}\u{2060}\u{FEFF}"),
            "bad"
        );
        assert_eq!(normalize("e\u{200B}\u{301}"), "é");
        assert_eq!(normalize("Ünïcödé"), "Ünïcödé");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn marks_out_of_order_take_the_full_normalization() {
        // U+0350 (class 230) before U+0316 (class 220): NFKC swaps them.
        let t = "a\u{350}\u{316}";
        assert!(prepare_fast(t, &CLASSES).is_none());
        assert_eq!(normalize(t), "a\u{316}\u{350}");
        let f = filter(&["a\u{316}\u{350}"], &[]);
        assert_eq!(f.check(t), Verdict::Blocked);
        // In order, the fast path keeps them.
        assert!(prepare_fast("a\u{316}\u{350}", &CLASSES).is_some());
    }

    #[test]
    fn plain_text_holds_only_kept_characters() {
        // `plain_text` judges each character by its own bytes: checking every character
        // alone covers every text.
        let mut buf = [0u8; 4];
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let plain = plain_text(c.encode_utf8(&mut buf).as_bytes());
            if c.is_ascii() {
                assert_eq!(plain, Some(c.is_ascii_uppercase()), "{c:?}");
            } else if plain.is_some() {
                assert_eq!(classify(c), class::KEEP, "U+{:04X}", u32::from(c));
            }
        }
        // The ranges it claims, all taken.
        for c in ('\u{4000}'..='\u{9FFF}').chain('\u{1F300}'..='\u{1FAFF}') {
            assert_eq!(plain_text(c.encode_utf8(&mut buf).as_bytes()), Some(false));
        }
        assert_eq!(plain_text("abc 中文 🎉".as_bytes()), Some(false));
        assert_eq!(plain_text("Abc".as_bytes()), Some(true));
        assert_eq!(plain_text("xY".as_bytes()), Some(true));
        assert_eq!(plain_text("é".as_bytes()), None);
        assert_eq!(plain_text("a，b".as_bytes()), None);
        assert_eq!(plain_text(b""), Some(false));
    }

    #[test]
    fn dfa_estimate_matches_the_built_automaton() {
        // Letters far apart: each its own byte class, and one more for the gap before it
        // (27 classes: a stride of 32, where 14 would give 16).
        let letters: Vec<char> = ('a'..='z').step_by(2).collect();
        let list: Vec<String> = (0..2000usize)
            .map(|i| (0..4).map(|k| letters[(i / 13usize.pow(k)) % 13]).collect())
            .collect();
        let f = Filter::new(&list, &[]).expect("builds");
        assert!(
            f.words
                .as_ref()
                .is_some_and(|w| w.kind() == AhoCorasickKind::DFA)
        );
        let words: Vec<String> = prepare_list(&list);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let estimate = dfa_bytes(&words);
        let real = f.words.as_ref().map_or(0, AhoCorasick::memory_usage);
        // The real one adds match lists and the like.
        assert!(
            estimate <= real && real < estimate + estimate / 8,
            "{estimate} vs {real}"
        );
    }

    /// Characters that exercise every class and path: case, compatibility forms, marks
    /// in and out of canonical order, composition across the text, zero-width ones.
    fn tricky() -> impl Strategy<Value = char> {
        prop_oneof![
            3 => any::<char>(),
            2 => prop::sample::select(vec![
                'a', 'b', 'A', 'B', 'i', 'İ', 'I', 'ı', 'Σ', 'σ', 'ς', 'ß', 'ẞ', 'e', 'é', 'E',
                '\u{301}', '\u{323}', '\u{316}', '\u{344}', '\u{345}', '\u{200B}',
                '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}', 'Ａ', 'ｂ', '，', 'ﬁ', '①',
                '𝟏', 'ｶ', 'ﾞ', '\u{1100}', '\u{1161}', '\u{11A8}', '가', '中', '🎉', '🄰',
                'Ω', 'K', 'Å', '\u{3099}', 'か', '\u{0F73}', 'ǅ', 'ǆ', 'Ⅻ', '㎏', '\u{350}',
                '\u{35C}', 'Ⱥ', 'ⱥ',
            ]),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(tricky(), 0..24).prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #[test]
        fn fast_path_equals_full_normalization(t in text()) {
            let prepared = prepare(&t);
            let normalized = normalize(&t);
            prop_assert_eq!(prepared.normalized.as_ref(), normalized.as_str());
            let folded = fold_all(&normalized);
            prop_assert_eq!(prepared.folded.as_ref(), folded.as_str());
            if prepared.aligned {
                prop_assert!(normalized.chars().all(|c| CLASSES.folded_len(c) == c.len_utf8()));
            }
        }

        #[test]
        fn normalize_is_idempotent(t in text()) {
            let once = normalize(&t);
            prop_assert_eq!(normalize(&once), once.clone());
            prop_assert!(!once.chars().any(is_zero_width));
        }

        #[test]
        fn check_never_panics_and_masks_in_place(
            t in text(),
            block in prop::collection::vec(text(), 0..4),
            mask in prop::collection::vec(text(), 0..6),
        ) {
            let f = Filter::new(&block, &mask).expect("small lists build");
            match f.check(&t) {
                Verdict::Pass | Verdict::Blocked => {}
                Verdict::Masked(m) => {
                    let normalized = normalize(&t);
                    prop_assert_eq!(m.chars().count(), normalized.chars().count());
                    prop_assert!(m.contains('*'));
                    // Only masked characters differ from the normalized text.
                    for (a, b) in m.chars().zip(normalized.chars()) {
                        prop_assert!(a == b || a == '*');
                    }
                }
            }
        }

        #[test]
        fn a_word_in_the_text_is_found(
            pre in text(),
            word in text(),
            post in text(),
        ) {
            prop_assume!(!fold_all(&normalize(&word)).is_empty());
            // Put the word between spaces, so NFKC cannot join it to its neighbours.
            let t = format!("{pre} {word} {post}");
            let f = Filter::new(std::slice::from_ref(&word), &[]).expect("builds");
            // A word ending in, or starting with, a mark or a composing character may
            // compose differently in the text: only assert when it is stable alone.
            let alone = normalize(&word);
            prop_assume!(normalize(&format!(" {word} ")) == format!(" {alone} "));
            prop_assert_eq!(f.check(&t), Verdict::Blocked);
            let f = Filter::new(&[], std::slice::from_ref(&word)).expect("builds");
            prop_assert!(matches!(f.check(&t), Verdict::Masked(_)));
        }
    }
}
