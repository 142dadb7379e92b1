//! Chat texts like a live room's (`--corpus mixed`): what senders append to their stamp so
//! that payload sizes, scripts and repetition look like real danmaku rather than ASCII
//! counters. That matters for anything that depends on the bytes: JSON escaping,
//! MessagePack string sizes, the gateway's text checks and filters, and above all how well
//! `batch` frames compress (permessage-deflate thrives on the repeats real rooms have).
//!
//! What a text is: a phrase of a few hundred (Chinese and Japanese danmaku slang, emoji,
//! Latin chat-speak, mixes) picked with a Zipf-like law over their popularity rank, so
//! "666" and "哈哈哈哈哈" come back all the time and the tail rarely; or a generated
//! variation: one character repeated ("哈哈哈哈哈哈哈"), a phrase plus emoji, or a short
//! sentence from a few templates. Every text is [`MIN_CHARS`]..=[`MAX_CHARS`] characters
//! (Unicode scalar values, as the gateway counts): phrases shorter than that are repeated
//! ("GG" → "GG GG"), as viewers do.
//!
//! Deterministic: a [`Chatter`] is a seeded generator, so sender `j` of two runs with the
//! same `--corpus-seed` sends the same texts in the same order (compare a run with and
//! without `--compress` on equal payloads).

use std::borrow::Cow;
use std::sync::LazyLock;

use clap::{Args, ValueEnum};
use serde::Serialize;

/// Fewest characters of a corpus text.
pub const MIN_CHARS: usize = 5;
/// Most characters of a corpus text.
pub const MAX_CHARS: usize = 40;
/// The gateway's longest chat text in characters (`limits.max_text_chars`, default 200):
/// stamp + phrase are kept within it.
pub const MAX_TEXT_CHARS: usize = 200;

/// Where senders' chat texts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CorpusKind {
    /// The send stamp alone: `lt:<run>:<sender>:<seq>:<unix_micros>`.
    Stamp,
    /// The stamp, a space, and a live-room phrase (CJK, emoji, Latin; 5-40 characters).
    Mixed,
}

/// The `--corpus` options of the scenarios whose senders chat.
#[derive(Debug, Clone, Args)]
pub struct CorpusArgs {
    /// Chat texts: `stamp` (the send stamp alone, as always) or `mixed` (stamp + a
    /// live-room phrase: Chinese/Japanese slang, emoji, Latin, 5-40 characters, with a
    /// Zipf-like share of repeats).
    #[arg(long, value_enum, default_value_t = CorpusKind::Stamp)]
    pub corpus: CorpusKind,
    /// Seed of `--corpus mixed`: with the same seed, sender j sends the same phrases in
    /// the same order.
    #[arg(long, default_value_t = 1)]
    pub corpus_seed: u64,
}

impl CorpusArgs {
    /// Sender `j`'s phrase generator, or `None` with `--corpus stamp`.
    pub fn chatter(&self, j: usize) -> Option<Chatter> {
        (self.corpus == CorpusKind::Mixed).then(|| Chatter::new(self.corpus_seed, j as u64))
    }
}

/// Appends `" " + phrase` to a stamped chat `text`, the phrase cut so that the whole text
/// stays within `max_chars` characters (nothing is appended if no room is left). The stamp
/// parser reads up to the first space, so the phrase may hold anything.
pub fn append(text: &mut String, phrase: &str, max_chars: usize) {
    let room = max_chars.saturating_sub(text.chars().count() + 1);
    let phrase = clip(phrase, room);
    if !phrase.trim().is_empty() {
        text.push(' ');
        text.push_str(phrase);
    }
}

/// Phrases by popularity (most popular first; the Zipf rank is the index).
const PHRASES: &[&str] = &[
    "666",
    "哈哈哈哈哈",
    "草",
    "awsl",
    "yyds",
    "8888",
    "前方高能",
    "lol",
    "GG",
    "🔥🔥🔥",
    "好听！",
    "主播好帅",
    "わらわら",
    "kksk",
    "23333",
    "哈哈哈哈哈哈哈哈",
    "来了来了",
    "泪目",
    "爷青回",
    "笑死",
    "绝了",
    "好家伙",
    "打卡",
    "😂😂😂",
    "www",
    "草生える",
    "かわいい",
    "nice",
    "Pog",
    "KEKW",
    "前排",
    "妙啊",
    "太强了",
    "离谱",
    "破防了",
    "冲冲冲",
    "❤️❤️❤️",
    "👏👏👏",
    "xswl",
    "牛啊",
    "稳了",
    "寄了",
    "麻了",
    "蚌埠住了",
    "好耶",
    "啊这",
    "真香",
    "确实",
    "下次一定",
    "主播加油",
    "晚上好",
    "こんばんは",
    "888888",
    "すごい",
    "きたー！",
    "神回",
    "てぇてぇ",
    "おつかれ",
    "gg wp",
    "let's go",
    "LETS GOOOO",
    "W",
    "no way",
    "omg",
    "🤣🤣",
    "😭😭😭",
    "💯",
    "🎉🎉🎉",
    "？？？",
    "有一说一",
    "芜湖起飞",
    "针不戳",
    "这波操作可以",
    "上车上车",
    "我裂开了",
    "我哭死",
    "DNA动了",
    "全体起立",
    "弹幕护体",
    "高能预警",
    "前方核能",
    "恭喜恭喜",
    "生日快乐",
    "新年快乐",
    "老板大气",
    "感谢老板",
    "谢谢主播",
    "再来一首",
    "好可爱",
    "好美啊",
    "开播了",
    "终于等到你",
    "这是什么神仙",
    "单曲循环",
    "好听到哭",
    "三连了",
    "关注了",
    "点赞投币",
    "礼物走一波",
    "求BGM",
    "BGM是什么",
    "这歌叫什么",
    "弹幕好多",
    "卡了卡了",
    "画质好糊",
    "声音小",
    "听不见",
    "回放在哪",
    "几点下播",
    "主播是哪里人",
    "第一次来",
    "来晚了",
    "刚来",
    "路过",
    "入坑了",
    "妈妈我要看",
    "太牛了",
    "牛逼",
    "nb",
    "hhhhh",
    "哈哈哈",
    "嘿嘿嘿",
    "呜呜呜",
    "啊啊啊啊啊",
    "好甜",
    "好燃",
    "帅炸了",
    "这也太好笑了",
    "我直接好家伙",
    "鼓励一下",
    "第一",
    "签到",
    "早上好",
    "晚安",
    "午安",
    "散了散了",
    "下播了吗",
    "还有多久",
    "救命",
    "绷不住了",
    "大家好",
    "初见です",
    "おはよう",
    "ありがとう",
    "がんばれ",
    "尊い",
    "それな",
    "まじか",
    "うおおおお",
    "ないす〜",
    "おめでとう",
    "天才",
    "かっこいい",
    "えぐい",
    "やばい",
    "助かる",
    "うまい",
    "おつ",
    "キター！",
    "ナイス",
    "エモい",
    "ｗｗｗ",
    "大草原",
    "草不可避",
    "ㅋㅋㅋㅋ",
    "대박",
    "hi chat",
    "hello from Brazil",
    "first",
    "F",
    "ez",
    "clutch",
    "wtf",
    "based",
    "sheesh",
    "OMEGALUL",
    "LUL",
    "monkaS",
    "PogChamp",
    "Kappa",
    "rip",
    "xd",
    "XD",
    "ok",
    "true",
    "goat",
    "🐐",
    "love this song",
    "encore!",
    "what a play",
    "so cute",
    "too good",
    "insane",
    "hype",
    "bruh",
    "lmao",
    "gg ez",
    "big W",
    "L take",
    "nice one",
    "EZ Clap",
    "5Head",
    "catJAM",
    "👍",
    "❤️",
    "🙏🙏",
    "😍",
    "🥰",
    "😱😱",
    "👀",
    "✨✨✨",
    "🌹🌹",
    "🚀🚀🚀",
    "💪",
    "😎",
    "🤡",
    "🍉",
    "🍺🍺",
    "666666 🔥",
    "awsl 😭",
    "GG 👏",
    "主播 yyds",
    "哈哈哈 lol",
    "好听！❤️",
    "kksk 🥰",
    "前方高能 ⚠️",
    "nb 👍",
    "草 www",
    "yyds！",
    "牛啊 666",
    "主播 nice",
    "这波 GG",
    "awsl awsl",
    "6到飞起",
    "强无敌",
    "这操作 666",
    "打call 📣",
    "LOL 这也行",
    "ww 草",
    "神回 🔥",
    "かわいい 💕",
    "888 恭喜",
    "前排 lol",
    "泪目 😭",
    "笑死 🤣",
];

/// Characters viewers repeat.
const REPEATED: &[&str] = &[
    "哈", "6", "8", "草", "w", "h", "啊", "？", "！", "2", "3", "呜", "嘿", "ｗ", "😂", "🔥", "👏",
    "❤", "e", "o", "冲", "牛", "好",
];

/// Emoji appended to phrases.
const EMOJI: &[&str] = &[
    "🔥", "😂", "👍", "❤️", "🎉", "👏", "😭", "🤣", "💯", "🙏", "😍", "🥰", "😱", "👀", "✨", "🌹",
    "🚀", "💪", "😎", "🤡", "🐶", "🍉", "🍺", "💕", "⚠️", "📣",
];

/// Short sentences: one part from each list, in order.
const SENTENCES: &[&[&[&str]]] = &[
    &[
        &[
            "主播",
            "这首歌",
            "这波",
            "弹幕",
            "今天",
            "老板",
            "这个操作",
            "BGM",
            "画面",
            "小姐姐",
            "UP主",
            "这局",
        ],
        &["太", "真", "好", "有点", "超级", "非常", "也太"],
        &[
            "好听", "可爱", "强", "离谱", "厉害", "稳", "秀", "甜", "燃", "帅", "好笑", "上头",
        ],
        &["了", "啊", "！", "吧", "呀", "哈哈哈", "", "！！", "😂"],
    ],
    &[
        &[
            "this",
            "that play",
            "the song",
            "chat",
            "streamer",
            "this game",
            "the boss",
            "that combo",
            "the vibe",
        ],
        &[" is", " was", " is so", " was kinda", " is literally"],
        &[
            " insane", " good", " crazy", " amazing", " cursed", " clean", " wild", " fire",
            " cute",
        ],
        &[" lol", "!!", "", " 😂", " 🔥", " ngl", " fr"],
    ],
    &[
        &["この曲", "今日の配信", "この展開", "声", "歌", "このプレイ"],
        &["めっちゃ", "本当に", "すごく", "ちょっと", "マジで"],
        &["好き", "いい", "かわいい", "すごい", "エモい", "面白い"],
        &["！", "〜", "ｗｗ", "です", "", "🥰"],
    ],
];

/// The phrases as sent (short ones repeated up to [`MIN_CHARS`]) and their cumulative
/// Zipf weights.
struct Corpus {
    phrases: Vec<String>,
    cumulative: Vec<f64>,
}

static CORPUS: LazyLock<Corpus> = LazyLock::new(|| {
    let phrases: Vec<String> = PHRASES.iter().map(|p| fill(p)).collect();
    let mut sum = 0.0;
    let cumulative = (0..phrases.len())
        .map(|rank| {
            sum += 1.0 / (rank as f64 + 1.0);
            sum
        })
        .collect();
    Corpus {
        phrases,
        cumulative,
    }
});

/// `phrase` repeated until it has [`MIN_CHARS`] characters (words with a space between
/// them, characters and digits run together), cut to [`MAX_CHARS`].
fn fill(phrase: &str) -> String {
    let n = phrase.chars().count().max(1);
    let mut out = phrase.to_string();
    let wordy = n > 1 && phrase.chars().all(|c| c.is_ascii_alphabetic());
    while out.chars().count() < MIN_CHARS {
        if wordy {
            out.push(' ');
        }
        out.push_str(phrase);
    }
    clip(&out, MAX_CHARS).to_string()
}

/// At most `max` characters of `s`.
fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// A seeded phrase generator (splitmix64): one per sender.
#[derive(Debug, Clone)]
pub struct Chatter {
    state: u64,
}

impl Chatter {
    /// Generator number `stream` (a sender) of seed `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut c = Self {
            state: seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03),
        };
        // Mix, so that neighbouring streams do not start alike.
        c.next_u64();
        c
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from.get(self.below(from.len())).copied().unwrap_or("")
    }

    /// A phrase by Zipf rank.
    fn phrase(&mut self) -> &'static str {
        let corpus = &*CORPUS;
        let total = corpus.cumulative.last().copied().unwrap_or(0.0);
        let x = self.unit() * total;
        let rank = corpus.cumulative.partition_point(|&c| c <= x);
        corpus
            .phrases
            .get(rank)
            .or(corpus.phrases.last())
            .map_or("", String::as_str)
    }

    /// The next chat text: [`MIN_CHARS`]..=[`MAX_CHARS`] characters.
    pub fn next_text(&mut self) -> Cow<'static, str> {
        let kind = self.unit();
        if kind < 0.7 {
            return Cow::Borrowed(self.phrase());
        }
        let text = if kind < 0.8 {
            let c = self.pick(REPEATED);
            c.repeat(MIN_CHARS + self.below(MAX_CHARS - MIN_CHARS + 1))
        } else if kind < 0.9 {
            let mut t = self.phrase().to_string();
            if self.unit() < 0.5 {
                t.push(' ');
            }
            let emoji = self.pick(EMOJI);
            for _ in 0..1 + self.below(3) {
                t.push_str(emoji);
            }
            t
        } else {
            let template = SENTENCES
                .get(self.below(SENTENCES.len()))
                .copied()
                .unwrap_or_default();
            let mut t: String = template.iter().map(|part| self.pick(part)).collect();
            while t.chars().count() < MIN_CHARS {
                t.push('！');
            }
            t
        };
        Cow::Owned(clip(&text, MAX_CHARS).to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::proto::ChatStamp;

    fn texts(seed: u64, stream: u64, n: usize) -> Vec<String> {
        let mut c = Chatter::new(seed, stream);
        (0..n).map(|_| c.next_text().into_owned()).collect()
    }

    #[test]
    fn every_text_is_within_the_length_bounds() {
        for seed in 0..4 {
            for t in texts(seed, 7, 20_000) {
                let n = t.chars().count();
                assert!((MIN_CHARS..=MAX_CHARS).contains(&n), "{t:?}: {n} chars");
                assert!(
                    !t.trim().is_empty() && !t.chars().any(char::is_control),
                    "{t:?}"
                );
            }
        }
        for p in PHRASES {
            let n = fill(p).chars().count();
            assert!((MIN_CHARS..=MAX_CHARS).contains(&n), "{p:?}");
        }
        assert_eq!(fill("GG"), "GG GG");
        assert_eq!(fill("666"), "666666");
        assert_eq!(fill("草"), "草草草草草");
        assert_eq!(fill("W"), "WWWWW");
    }

    #[test]
    fn same_seed_same_texts_other_seed_or_sender_others() {
        assert_eq!(texts(42, 3, 500), texts(42, 3, 500));
        assert_ne!(texts(42, 3, 500), texts(43, 3, 500));
        assert_ne!(texts(42, 3, 500), texts(42, 4, 500));
    }

    #[test]
    fn popular_phrases_repeat() {
        let all = texts(1, 0, 10_000);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for t in &all {
            *counts.entry(t.as_str()).or_default() += 1;
        }
        let top = counts.values().max().copied().unwrap_or(0);
        // The top phrase has ~1/H(n) of the 70% drawn by rank: about a tenth.
        assert!(top > all.len() / 20, "top phrase only {top} times");
        assert!(counts.len() < all.len() / 2, "{} distinct", counts.len());
        assert!(
            counts["666666"] > 300 && counts["哈哈哈哈哈"] > 150,
            "{counts:?}"
        );
    }

    #[test]
    fn scripts_are_mixed() {
        let all = texts(9, 1, 10_000);
        let share = |f: fn(char) -> bool| {
            all.iter().filter(|t| t.chars().any(f)).count() as f64 / all.len() as f64
        };
        let han = share(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
        let kana = share(|c| ('\u{3040}'..='\u{30ff}').contains(&c));
        let emoji = share(|c| ('\u{1f300}'..='\u{1faff}').contains(&c) || c == '❤');
        let latin = share(|c| c.is_ascii_alphabetic());
        let digits = share(|c| c.is_ascii_digit());
        for (name, s, min) in [
            ("han", han, 0.3),
            ("kana", kana, 0.03),
            ("emoji", emoji, 0.1),
            ("latin", latin, 0.15),
            ("digits", digits, 0.1),
        ] {
            assert!(s >= min, "{name}: {s:.3} < {min}");
        }
    }

    #[test]
    fn appended_phrases_keep_the_stamp_readable_and_the_text_short() {
        let stamp = ChatStamp::new("ab12");
        let mut c = Chatter::new(5, 0);
        for seq in 0..2000 {
            let mut text = stamp.text(11, seq, 1_700_000_000_123_456);
            append(&mut text, &c.next_text(), MAX_TEXT_CHARS);
            assert!(text.chars().count() <= MAX_TEXT_CHARS);
            assert_eq!(stamp.sent_at(&text), Some(1_700_000_000_123_456), "{text}");
            let parsed = stamp.parse(&text).unwrap();
            assert_eq!((parsed.sender, parsed.seq), (11, seq));
        }
        let mut text = stamp.text(1, 2, 3);
        let len = text.chars().count();
        append(&mut text, "哈哈哈哈哈哈", len + 4);
        assert_eq!(text, format!("{} 哈哈哈", stamp.text(1, 2, 3)));
        let mut full = stamp.text(1, 2, 3);
        append(&mut full, "哈哈", len + 1);
        assert_eq!(full, stamp.text(1, 2, 3), "no room: nothing appended");
        let mut colon = stamp.text(1, 2, 3);
        append(&mut colon, "a:b 9:99", MAX_TEXT_CHARS);
        assert_eq!(stamp.sent_at(&colon), Some(3));
    }
}
