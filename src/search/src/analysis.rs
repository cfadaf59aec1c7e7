//! How text becomes index terms, the same way for messages and for queries: Unicode word
//! boundaries (dictionaries for Chinese and Japanese, a model for Thai, Lao, Khmer and
//! Burmese, UAX #29 for the rest), lowercase, stemming in one language, and Latin
//! diacritics folded (`café` finds `cafe`). Stemming comes before folding because the
//! stemmers expect the accents of their language.

use icu_segmenter::{WordSegmenter, options::WordBreakInvariantOptions};
use tantivy::tokenizer::{
    AsciiFoldingFilter, Language as Stemming, LowerCaser, RemoveLongFilter, Stemmer, TextAnalyzer,
    Token, TokenStream, Tokenizer,
};

/// Words longer than this (base64 blobs, long URLs) are not indexed.
const MAX_WORD_BYTES: usize = 64;

/// A language the index stems for, by its ISO 639-1 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Language(Stemming);

impl Language {
    pub const ENGLISH: Language = Language(Stemming::English);

    /// The stemming language of a BCP 47 tag (`de`, `pt-BR`, `en_GB`), if one exists.
    pub fn from_tag(tag: &str) -> Option<Self> {
        let primary = tag.split(['-', '_']).next()?.to_ascii_lowercase();
        let stemming = match primary.as_str() {
            "ar" => Stemming::Arabic,
            "da" => Stemming::Danish,
            "nl" => Stemming::Dutch,
            "en" => Stemming::English,
            "fi" => Stemming::Finnish,
            "fr" => Stemming::French,
            "de" => Stemming::German,
            "el" => Stemming::Greek,
            "hu" => Stemming::Hungarian,
            "it" => Stemming::Italian,
            "no" | "nb" | "nn" => Stemming::Norwegian,
            "pt" => Stemming::Portuguese,
            "ro" => Stemming::Romanian,
            "ru" => Stemming::Russian,
            "es" => Stemming::Spanish,
            "sv" => Stemming::Swedish,
            "ta" => Stemming::Tamil,
            "tr" => Stemming::Turkish,
            _ => return None,
        };
        Some(Self(stemming))
    }
}

/// Splits text at Unicode word boundaries and keeps the word-like segments (letters,
/// numbers, ideographs), with their byte offsets.
#[derive(Clone, Copy)]
pub struct WordTokenizer;

/// The words of one text, produced up front: segmenting needs the whole text anyway.
pub struct Words {
    tokens: Vec<Token>,
    next: usize,
}

impl TokenStream for Words {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

impl Tokenizer for WordTokenizer {
    type TokenStream<'a> = Words;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> Words {
        Words { tokens: words(text), next: 0 }
    }
}

/// The word-like segments of `text`, positions counted in words.
fn words(text: &str) -> Vec<Token> {
    let segmenter = WordSegmenter::new_auto(WordBreakInvariantOptions::default());
    let mut tokens = Vec::new();
    let mut start = 0;
    for (end, kind) in segmenter.segment_str(text).iter_with_word_type() {
        if end > start && kind.is_word_like() {
            tokens.push(Token {
                offset_from: start,
                offset_to: end,
                position: tokens.len(),
                text: text[start..end].to_owned(),
                position_length: 1,
            });
        }
        start = end;
    }
    tokens
}

/// The analyzers for one index: words as written (lowercased, folded), and stemmed in
/// each language the server knows of.
#[derive(Clone)]
pub struct Analyzers {
    plain: TextAnalyzer,
    stemmed: Vec<(Language, TextAnalyzer)>,
}

/// One word of a text as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// Byte range of the word in the text.
    pub offsets: (usize, usize),
    /// Its position among the text's words.
    pub position: usize,
    pub term: String,
}

impl Analyzers {
    /// Analyzers stemming in each of `languages`.
    pub fn new(languages: &[Language]) -> Self {
        let plain = TextAnalyzer::builder(WordTokenizer)
            .filter(RemoveLongFilter::limit(MAX_WORD_BYTES))
            .filter(LowerCaser)
            .filter(AsciiFoldingFilter)
            .build();
        let stemmed = languages
            .iter()
            .map(|&language| {
                let analyzer = TextAnalyzer::builder(WordTokenizer)
                    .filter(RemoveLongFilter::limit(MAX_WORD_BYTES))
                    .filter(LowerCaser)
                    .filter(Stemmer::new(language.0))
                    .filter(AsciiFoldingFilter)
                    .build();
                (language, analyzer)
            })
            .collect();
        Self { plain, stemmed }
    }

    /// The words of `text`, lowercased and folded.
    pub fn plain(&mut self, text: &str) -> Vec<Term> {
        collect(&mut self.plain, text)
    }

    /// The words of `text` stemmed in `language` (plain if the index does not stem it).
    pub fn stemmed(&mut self, language: Language, text: &str) -> Vec<Term> {
        match self.stemmed.iter_mut().find(|(l, _)| *l == language) {
            Some((_, analyzer)) => collect(analyzer, text),
            None => collect(&mut self.plain, text),
        }
    }

    /// Every stem `word` has in the languages the index stems for, deduplicated.
    pub fn stems_of(&mut self, word: &str) -> Vec<String> {
        let mut stems: Vec<String> = self
            .stemmed
            .iter_mut()
            .filter_map(|(_, analyzer)| collect(analyzer, word).into_iter().next())
            .map(|t| t.term)
            .collect();
        stems.sort();
        stems.dedup();
        stems
    }
}

fn collect(analyzer: &mut TextAnalyzer, text: &str) -> Vec<Term> {
    let mut stream = analyzer.token_stream(text);
    let mut out = Vec::new();
    while let Some(token) = stream.next() {
        out.push(Term {
            offsets: (token.offset_from, token.offset_to),
            position: token.position,
            term: token.text.clone(),
        });
    }
    out
}

/// Whether `word` is written in a script without spaces between words, where a name's
/// later characters start words of their own (`小明` in `王小明`).
pub fn unspaced_script(word: &str) -> bool {
    word.chars().any(|c| {
        matches!(c as u32,
            0x0E00..=0x0EFF // Thai, Lao
            | 0x1000..=0x109F // Burmese
            | 0x1780..=0x17FF // Khmer
            | 0x3040..=0x30FF // Hiragana, Katakana
            | 0x3400..=0x4DBF // CJK extension A
            | 0x4E00..=0x9FFF // CJK unified ideographs
            | 0xAC00..=0xD7AF // Hangul syllables
            | 0xF900..=0xFAFF // CJK compatibility ideographs
            | 0x20000..=0x3134F // CJK extensions B-G
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(a: &mut Analyzers, text: &str) -> Vec<String> {
        a.plain(text).into_iter().map(|t| t.term).collect()
    }

    #[test]
    fn latin_words_are_lowercased_and_folded() {
        let mut a = Analyzers::new(&[Language::ENGLISH]);
        assert_eq!(terms(&mut a, "Café, NAÏVE straße!"), ["cafe", "naive", "strasse"]);
    }

    #[test]
    fn chinese_japanese_and_thai_are_split_into_words() {
        let mut a = Analyzers::new(&[]);
        let zh = terms(&mut a, "我们明天在北京见面");
        assert!(zh.contains(&"北京".to_owned()), "{zh:?}");
        let ja = terms(&mut a, "こんにちは世界");
        assert_eq!(ja, ["こんにちは", "世界"]);
        let th = terms(&mut a, "ทุกสองสัปดาห์");
        assert_eq!(th, ["ทุก", "สอง", "สัปดาห์"]);
    }

    #[test]
    fn punctuation_and_spaces_are_not_words() {
        let mut a = Analyzers::new(&[]);
        assert_eq!(terms(&mut a, " -- hello,   world 42 ?!"), ["hello", "world", "42"]);
        let offsets: Vec<_> = a.plain("ab cd").into_iter().map(|t| t.offsets).collect();
        assert_eq!(offsets, [(0, 2), (3, 5)]);
    }

    #[test]
    fn stems_are_per_language() {
        let mut a = Analyzers::new(&[Language::ENGLISH, Language::from_tag("de").unwrap()]);
        let en: Vec<_> =
            a.stemmed(Language::ENGLISH, "running meetings").into_iter().map(|t| t.term).collect();
        assert_eq!(en, ["run", "meet"]);
        let de = Language::from_tag("de-AT").unwrap();
        let stems: Vec<_> = a.stemmed(de, "Häuser").into_iter().map(|t| t.term).collect();
        assert_eq!(stems, [a.stemmed(de, "Haus")[0].term.clone()]);
        assert!(a.stems_of("meetings").contains(&"meet".to_owned()));
        assert_eq!(Language::from_tag("xx"), None);
    }
}
