//! How text becomes index terms, the same way for messages and for queries: Unicode word
//! boundaries (dictionaries for Chinese and Japanese, a model for Thai, Lao, Khmer and
//! Burmese, UAX #29 for the rest), lowercase, Latin diacritics folded (`café` finds
//! `cafe`), and each word's stem in one language. Text is segmented once and each word
//! handled on its own: most words are lowercase ASCII and skip folding altogether.
//! Stemming comes before folding because the stemmers expect the accents of their
//! language.

use frostem::{Algorithm, Stemmer};
use icu_segmenter::{WordSegmenter, WordSegmenterBorrowed, options::WordBreakInvariantOptions};
use tantivy::tokenizer::{AsciiFoldingFilter, RawTokenizer, TextAnalyzer};

/// Words longer than this (base64 blobs, long URLs) are not indexed.
const MAX_WORD_BYTES: usize = 64;

/// A language the index stems for, by its ISO 639-1 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Language(Algorithm);

impl Language {
    pub const ENGLISH: Language = Language(Algorithm::English);

    /// The stemming language of a BCP 47 tag (`de`, `pt-BR`, `en_GB`), if one exists.
    pub fn from_tag(tag: &str) -> Option<Self> {
        let primary = tag.split(['-', '_']).next()?.to_ascii_lowercase();
        let algorithm = match primary.as_str() {
            "ar" => Algorithm::Arabic,
            "da" => Algorithm::Danish,
            "nl" => Algorithm::Dutch,
            "en" => Algorithm::English,
            "fi" => Algorithm::Finnish,
            "fr" => Algorithm::French,
            "de" => Algorithm::German,
            "el" => Algorithm::Greek,
            "hu" => Algorithm::Hungarian,
            "it" => Algorithm::Italian,
            "no" | "nb" | "nn" => Algorithm::Norwegian,
            "pt" => Algorithm::Portuguese,
            "ro" => Algorithm::Romanian,
            "ru" => Algorithm::Russian,
            "es" => Algorithm::Spanish,
            "sv" => Algorithm::Swedish,
            "ta" => Algorithm::Tamil,
            "tr" => Algorithm::Turkish,
            _ => return None,
        };
        Some(Self(algorithm))
    }
}

/// One word of a text as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// Byte range of the word in the text.
    pub offsets: (usize, usize),
    /// Lowercased and folded.
    pub plain: String,
    /// Its stem, when stemming changes it.
    pub stem: Option<String>,
}

/// The word-like segments of `text` (letters, numbers, ideographs) as byte ranges. They
/// never hold whitespace, which the index relies on to pass them on space-separated.
fn segments(segmenter: WordSegmenterBorrowed<'static>, text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (end, kind) in segmenter.segment_str(text).iter_with_word_type() {
        if end > start && kind.is_word_like() && end - start <= MAX_WORD_BYTES {
            out.push((start, end));
        }
        start = end;
    }
    out
}

/// Analysis for one index: stemming in each language the server knows of.
#[derive(Clone)]
pub struct Analyzers {
    /// Made once: making one looks its data up, a fifth of analysing a short message.
    segmenter: WordSegmenterBorrowed<'static>,
    folding: TextAnalyzer,
    stemmers: Vec<(Language, Stemmer)>,
}

impl Analyzers {
    /// Analysis stemming in each of `languages`.
    pub fn new(languages: &[Language]) -> Self {
        let folding =
            TextAnalyzer::builder(RawTokenizer::default()).filter(AsciiFoldingFilter).build();
        let stemmers = languages.iter().map(|&l| (l, Stemmer::new(l.0))).collect();
        let segmenter = WordSegmenter::new_auto(WordBreakInvariantOptions::default());
        Self { segmenter, folding, stemmers }
    }

    fn fold(&mut self, word: String) -> String {
        if word.is_ascii() {
            return word;
        }
        let mut stream = self.folding.token_stream(&word);
        match stream.next() {
            Some(token) => token.text.clone(),
            None => word.clone(),
        }
    }

    fn lowercase(word: &str) -> String {
        if word.is_ascii() { word.to_ascii_lowercase() } else { word.to_lowercase() }
    }

    /// The words of `text`, with their stems in `language` (none: no stems).
    pub fn words(&mut self, text: &str, language: Option<Language>) -> Vec<Word> {
        let stemmer =
            language.and_then(|l| self.stemmers.iter().find(|(s, _)| *s == l)).map(|(_, s)| *s);
        segments(self.segmenter, text)
            .into_iter()
            .map(|(from, to)| {
                let lower = Self::lowercase(&text[from..to]);
                let stem = stemmer.map(|s| s.stem(&lower).into_owned());
                let plain = self.fold(lower);
                let stem = stem.map(|s| self.fold(s)).filter(|s| *s != plain);
                Word { offsets: (from, to), plain, stem }
            })
            .collect()
    }

    /// Every stem `word` (one word of a query, as written) has in the languages the
    /// index stems for, deduplicated.
    pub fn stems_of(&mut self, word: &str) -> Vec<String> {
        let lower = Self::lowercase(word);
        let stems: Vec<String> =
            self.stemmers.iter().map(|(_, s)| s.stem(&lower).into_owned()).collect();
        let mut stems: Vec<String> = stems.into_iter().map(|s| self.fold(s)).collect();
        stems.sort();
        stems.dedup();
        stems
    }
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
        a.words(text, None).into_iter().map(|w| w.plain).collect()
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
        let offsets: Vec<_> = a.words("ab cd", None).into_iter().map(|t| t.offsets).collect();
        assert_eq!(offsets, [(0, 2), (3, 5)]);
    }

    #[test]
    fn stems_are_per_language_and_only_kept_when_they_differ() {
        let de = Language::from_tag("de-AT").unwrap();
        let mut a = Analyzers::new(&[Language::ENGLISH, de]);
        let en = a.words("running meetings meet", Some(Language::ENGLISH));
        let stems: Vec<_> = en.iter().map(|w| w.stem.as_deref()).collect();
        assert_eq!(stems, [Some("run"), Some("meet"), None]);
        let haus = a.words("Haus", Some(de))[0].clone();
        let hauser = a.words("Häuser", Some(de))[0].clone();
        assert_eq!(
            hauser.stem.as_ref().unwrap_or(&hauser.plain),
            haus.stem.as_ref().unwrap_or(&haus.plain)
        );
        assert!(a.stems_of("Meetings").contains(&"meet".to_owned()));
        assert_eq!(Language::from_tag("xx"), None);
    }
}
