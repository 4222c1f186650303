//! OpenCLIP's `SimpleTokenizer` (OpenAI CLIP BPE): text cleaning as open_clip 2.22 does it
//! (ftfy, HTML unescape, whitespace collapse, lower-case), the CLIP pre-tokenisation regex,
//! byte-level BPE over the shipped merges, and the 77-id framing with start/end tokens.
//!
//! Written against open_clip's tokenizer rather than the `tokenizers` crate: the behaviour that
//! matters (ftfy cleaning, pad id 0, truncation keeping the end token) lives outside any BPE model.

use crate::{Error, Result};
use regex::Regex;
use std::collections::HashMap;
use std::io::Read;
use unicode_normalization::UnicodeNormalization;

const VOCAB_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// Number of merges open_clip reads from the file (`49152 - 256 - 2`).
const NUM_MERGES: usize = 49152 - 256 - 2;

pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;
pub const PAD: u32 = 0;
pub const CONTEXT_LENGTH: usize = 77;

pub struct Tokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    byte_encoder: [char; 256],
    pattern: Regex,
}

/// GPT-2's reversible byte → printable-unicode table, in its own order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid code point")))
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer from the vocabulary compiled into the binary.
    pub fn new() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCAB_GZ)
            .read_to_string(&mut text)
            .map_err(|e| Error::Config(format!("BPE vocabulary: {e}")))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(NUM_MERGES)
            .map(|line| {
                let mut it = line.split(' ');
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(Error::Config(format!("BPE vocabulary: bad merge line '{line}'"))),
                }
            })
            .collect::<Result<_>>()?;
        let table = bytes_to_unicode();
        let mut byte_encoder = ['\0'; 256];
        for &(b, c) in &table {
            byte_encoder[b as usize] = c;
        }
        let mut vocab: Vec<String> = table.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder = vocab.into_iter().enumerate().map(|(i, v)| (v, i as u32)).collect();
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i as u32)).collect();
        let pattern = Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self { encoder, ranks, byte_encoder, pattern })
    }

    fn bpe(&self, token: &str) -> Vec<String> {
        if token == "<start_of_text>" || token == "<end_of_text>" {
            return vec![token.to_string()];
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0].clone(), p[1].clone())).map(|&r| (r, p)))
                .min_by_key(|&(r, _)| r);
            let Some((_, pair)) = best else { break };
            let (first, second) = (pair[0].clone(), pair[1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }

    /// BPE ids of `text` after cleaning, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text = clean(text);
        let mut ids = Vec::new();
        for piece in self.pattern.find_iter(&text) {
            let mapped: String =
                piece.as_str().bytes().map(|b| self.byte_encoder[b as usize]).collect();
            for sub in self.bpe(&mapped) {
                // Every BPE symbol is in the vocabulary by construction (bytes, merges).
                if let Some(&id) = self.encoder.get(&sub) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// `open_clip.tokenize`: `[SOT] + ids + [EOT]`, cut to `context_length` keeping EOT last,
    /// right-padded with 0.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(context_length);
        ids.push(SOT);
        ids.extend(self.encode(text));
        ids.push(EOT);
        if ids.len() > context_length {
            ids.truncate(context_length);
            ids[context_length - 1] = EOT;
        }
        ids.resize(context_length, PAD);
        ids
    }
}

/// `whitespace_clean(basic_clean(text)).lower()` of open_clip.
pub fn clean(text: &str) -> String {
    // ftfy unescapes HTML itself only when the text does not look like HTML.
    let mut t = fix_text(text);
    if !t.contains('<') {
        t = html_unescape(&t);
    }
    let t = html_unescape(&html_unescape(&t));
    let collapsed = t.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.to_lowercase()
}

/// The parts of `ftfy.fix_text` (default settings) that change prompts: mojibake repair,
/// control characters, ligatures, full-width forms, curly quotes, then NFC.
fn fix_text(text: &str) -> String {
    let text = fix_mojibake(text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let cp = c as u32;
        match c {
            '\u{2018}'..='\u{201b}' | '\u{02bc}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\u{3000}' => out.push(' '),
            _ if (0xFF01..0xFFF0).contains(&cp) => out.extend(c.nfkc()),
            _ if is_removed_control(cp) => {}
            _ => match ligature(c) {
                Some(s) => out.push_str(s),
                None => out.push(c),
            },
        }
    }
    out.nfc().collect()
}

fn is_removed_control(cp: u32) -> bool {
    matches!(cp, 0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x80..=0x9F | 0xFEFF | 0xFFF9..=0xFFFC | 0x206A..=0x206F)
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// Windows-1252 code points of bytes 0x80..0x9F (undefined ones map to the C1 control itself,
/// as ftfy's "sloppy" codec does).
const CP1252_HIGH: [u32; 32] = [
    0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
    0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014,
    0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
];

/// UTF-8 that was decoded as Windows-1252/Latin-1 ("cafÃ©"): re-encode and decode again when the
/// whole text round-trips to valid UTF-8 with at least one multi-byte sequence.
fn fix_mojibake(text: &str) -> String {
    let mut bytes = Vec::with_capacity(text.len());
    for c in text.chars() {
        let cp = c as u32;
        let b = if cp < 0x80 || (0xA0..=0xFF).contains(&cp) {
            cp as u8
        } else if let Some(i) = CP1252_HIGH.iter().position(|&x| x == cp) {
            0x80 + i as u8
        } else {
            return text.to_string();
        };
        bytes.push(b);
    }
    if bytes.iter().all(|&b| b < 0x80) {
        return text.to_string();
    }
    match String::from_utf8(bytes) {
        Ok(fixed) => fixed,
        Err(_) => text.to_string(),
    }
}

/// Python's `html.unescape` for numeric references and the common named entities.
fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        match decode_entity(rest) {
            Some((decoded, len)) => {
                out.push_str(&decoded);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes the entity at the start of `s` (which starts with '&'): (text, bytes consumed).
fn decode_entity(s: &str) -> Option<(String, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 3),
            None => (num, 10, 2),
        };
        let n = digits.chars().take_while(|c| c.is_digit(radix)).count();
        if n == 0 {
            return None;
        }
        let cp = u32::from_str_radix(&digits[..n], radix).ok()?;
        let semi = usize::from(digits[n..].starts_with(';'));
        let c = match cp {
            0x80..=0x9F => char::from_u32(CP1252_HIGH[(cp - 0x80) as usize]),
            0 => Some('\u{FFFD}'),
            _ => char::from_u32(cp),
        }
        .unwrap_or('\u{FFFD}');
        return Some((c.to_string(), skip + n + semi));
    }
    const NAMED: &[(&str, &str)] = &[
        ("amp", "&"),
        ("lt", "<"),
        ("gt", ">"),
        ("quot", "\""),
        ("apos", "'"),
        ("nbsp", "\u{a0}"),
        ("copy", "©"),
        ("reg", "®"),
        ("trade", "™"),
        ("hellip", "…"),
        ("mdash", "—"),
        ("ndash", "–"),
        ("lsquo", "‘"),
        ("rsquo", "’"),
        ("ldquo", "“"),
        ("rdquo", "”"),
        ("laquo", "«"),
        ("raquo", "»"),
        ("deg", "°"),
        ("times", "×"),
        ("divide", "÷"),
        ("euro", "€"),
        ("pound", "£"),
        ("yen", "¥"),
        ("cent", "¢"),
        ("sect", "§"),
        ("middot", "·"),
        ("bull", "•"),
    ];
    let n = body.chars().take_while(|c| c.is_ascii_alphanumeric()).count();
    let name = &body[..n];
    let semi = body[n..].starts_with(';');
    let (_, value) = NAMED.iter().find(|(k, _)| *k == name)?;
    // Without ';' Python only accepts the legacy HTML4 names; these are among them.
    if !semi && !matches!(name, "amp" | "lt" | "gt" | "quot" | "nbsp" | "copy" | "reg") {
        return None;
    }
    Some((value.to_string(), 1 + n + usize::from(semi)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_pads() {
        let t = Tokenizer::new().unwrap();
        let ids = t.tokenize("", CONTEXT_LENGTH);
        assert_eq!(&ids[..3], &[SOT, EOT, PAD]);
        assert_eq!(ids.len(), 77);
        let long = "cat ".repeat(200);
        let ids = t.tokenize(&long, CONTEXT_LENGTH);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], EOT);
    }

    #[test]
    fn cleaning() {
        assert_eq!(clean("cafÃ© dÃ©jÃ\u{a0} vu"), "café déjà vu");
        assert_eq!(clean("&amp;amp; &amp;lt;tag&amp;gt;"), "& <tag>");
        assert_eq!(clean("Ｆｕｌｌ ﬁne “q”"), "full fine \"q\"");
    }
}
