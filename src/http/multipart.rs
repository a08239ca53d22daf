//! The body of a multipart media upload (`uploadType=multipart`), parsed as
//! it streams: a metadata part (JSON, ignored: the name is in the URL), then
//! the media part, whose bytes are handed on as they arrive.
//!
//! Google's Python client writes bare LF line ends and closes with
//! `\n--B--\n`, so the line end is the one of the first delimiter line, not
//! RFC 2046's CRLF: a payload that ends in `\r` stays intact.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

/// The most a body may carry besides the media bytes: the preamble, the
/// metadata part, every part's headers, and the epilogue.
pub const MAX_FRAMING: usize = 64 << 10;

/// The boundary a `multipart/…` content type declares, checked as RFC 2046
/// allows (1 to 70 characters).
pub fn boundary(content_type: &str) -> Result<String, String> {
    let (kind, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !kind.trim().to_ascii_lowercase().starts_with("multipart/") {
        return Err(format!("uploadType=multipart needs a multipart/related body, not {:?}", kind.trim()));
    }
    let boundary = params.split(';').find_map(|p| {
        let (key, value) = p.split_once('=')?;
        key.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"').to_string())
    });
    match boundary {
        Some(b) if (1..=70).contains(&b.len()) => Ok(b),
        Some(b) => Err(format!("the multipart boundary {b:?} is not 1 to 70 characters long")),
        None => Err("the multipart content type declares no boundary".into()),
    }
}

/// Where the parser is in the body.
#[derive(Debug, PartialEq)]
enum State {
    /// Before the first delimiter line.
    Preamble,
    /// In a part's headers.
    Headers,
    /// In the metadata part's body.
    Metadata,
    /// In the media part's body.
    Media,
    /// Just past the media part's delimiter: `--` must follow.
    Closing,
    /// Past the closing delimiter.
    Epilogue,
}

/// A streaming parser of a multipart body: fed the body's bytes, it gives
/// back the media part's.
pub struct Parser {
    boundary: Vec<u8>,
    /// The line end plus `--boundary`, once the first delimiter told the line end.
    delimiter: Vec<u8>,
    state: State,
    buffer: BytesMut,
    /// Bytes of framing seen so far.
    framing: usize,
}

impl Parser {
    pub fn new(boundary: &str) -> Parser {
        Parser {
            boundary: [b"--", boundary.as_bytes()].concat(),
            delimiter: Vec::new(),
            state: State::Preamble,
            buffer: BytesMut::new(),
            framing: 0,
        }
    }

    /// Takes the next bytes of the body; gives back the media bytes they
    /// complete (if any).
    pub fn push(&mut self, data: &[u8]) -> Result<Option<Bytes>, String> {
        self.buffer.extend_from_slice(data);
        let mut media = None;
        loop {
            let before = (self.buffer.len(), std::mem::discriminant(&self.state));
            if self.state == State::Media {
                // At most one piece is not empty: the rest is shorter than the delimiter.
                if let Some(piece) = self.media().filter(|m| !m.is_empty()) {
                    media = Some(piece);
                }
            } else {
                self.framing()?;
            }
            if (self.buffer.len(), std::mem::discriminant(&self.state)) == before {
                break;
            }
        }
        if self.framing + self.buffer.len() > MAX_FRAMING && self.state != State::Media {
            return Err(format!(
                "the multipart body has more than {} KiB besides the media bytes",
                MAX_FRAMING >> 10
            ));
        }
        Ok(media)
    }

    /// At the body's end: whether the media part was closed.
    pub fn end(&self) -> Result<(), String> {
        match self.state {
            State::Epilogue => Ok(()),
            State::Preamble => Err("the multipart body has no delimiter line for its boundary".into()),
            State::Headers | State::Metadata => Err("the multipart body has no media part".into()),
            State::Media | State::Closing => {
                Err("the multipart body ended before its closing delimiter".into())
            }
        }
    }

    /// In the media part: hands on what cannot be the start of the
    /// delimiter, up to the delimiter once it is found.
    fn media(&mut self) -> Option<Bytes> {
        match memmem::find(&self.buffer, &self.delimiter) {
            Some(at) => {
                let media = self.buffer.split_to(at).freeze();
                let _ = self.buffer.split_to(self.delimiter.len());
                self.state = State::Closing;
                Some(media)
            }
            None => {
                let keep = (self.delimiter.len() - 1).min(self.buffer.len());
                Some(self.buffer.split_to(self.buffer.len() - keep).freeze())
            }
        }
    }

    /// Outside the media bytes: moves past what the buffer holds of the
    /// framing, as far as it can.
    fn framing(&mut self) -> Result<(), String> {
        match self.state {
            State::Preamble => {
                // The first delimiter starts the body or a line.
                let mut from = 0;
                let found = loop {
                    let Some(at) = memmem::find(&self.buffer[from..], &self.boundary).map(|a| a + from)
                    else {
                        break None;
                    };
                    if at == 0 || self.buffer[at - 1] == b'\n' {
                        break Some(at);
                    }
                    from = at + 1;
                };
                let Some(at) = found else { return Ok(()) };
                let rest = &self.buffer[at + self.boundary.len()..];
                let eol: &[u8] = if rest.starts_with(b"\r\n") {
                    b"\r\n"
                } else if rest.starts_with(b"\n") {
                    b"\n"
                } else if rest.len() < 2 {
                    return Ok(());
                } else {
                    return Err("the multipart body's first delimiter is not followed by a line end".into());
                };
                self.delimiter = [eol, &self.boundary].concat();
                self.consume(at + self.boundary.len() + eol.len());
                self.state = State::Headers;
            }
            State::Headers => {
                let eol = self.eol().to_vec();
                // Headers end at an empty line; a part without headers starts with one.
                let end = if self.buffer.starts_with(&eol) {
                    Some((0, eol.len()))
                } else {
                    memmem::find(&self.buffer, &[&eol[..], &eol[..]].concat())
                        .map(|at| (at, at + 2 * eol.len()))
                };
                let Some((at, past)) = end else { return Ok(()) };
                let headers = String::from_utf8_lossy(&self.buffer[..at]).to_ascii_lowercase();
                let header = |name: &str| {
                    headers.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim() == name).then(|| v.trim().to_string())
                    })
                };
                if let Some(encoding) = header("content-transfer-encoding")
                    && !matches!(encoding.as_str(), "binary" | "8bit" | "7bit")
                {
                    return Err(format!(
                        "a multipart part has Content-Transfer-Encoding {encoding:?}: send the media bytes as binary"
                    ));
                }
                let metadata = header("content-type").is_some_and(|t| t.starts_with("application/json"));
                self.consume(past);
                self.state = if metadata { State::Metadata } else { State::Media };
            }
            State::Metadata => {
                let Some(at) = memmem::find(&self.buffer, &self.delimiter) else { return Ok(()) };
                let rest = &self.buffer[at + self.delimiter.len()..];
                let eol = self.eol();
                // Two bytes tell a closing delimiter from a line end.
                if rest.len() < 2 {
                    return Ok(());
                }
                if rest.starts_with(b"--") {
                    return Err("the multipart body has no media part".into());
                }
                if !rest.starts_with(eol) {
                    return Err("a multipart delimiter is not followed by a line end".into());
                }
                self.consume(at + self.delimiter.len() + eol.len());
                self.state = State::Headers;
            }
            State::Closing => {
                if self.buffer.len() < 2 {
                    return Ok(());
                }
                if !self.buffer.starts_with(b"--") {
                    return Err("the multipart body has a part after its media part: send metadata first, then the media".into());
                }
                self.consume(2);
                self.state = State::Epilogue;
            }
            State::Epilogue => {
                let all = self.buffer.len();
                self.consume(all);
            }
            State::Media => unreachable!("media bytes are not framing"),
        }
        Ok(())
    }

    fn eol(&self) -> &[u8] {
        &self.delimiter[..self.delimiter.len() - self.boundary.len()]
    }

    fn consume(&mut self, n: usize) {
        let _ = self.buffer.split_to(n);
        self.framing += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The media bytes of `body` fed in pieces cut at `cuts`, or the error.
    fn parse(body: &[u8], boundary: &str, cuts: &[usize]) -> Result<Vec<u8>, String> {
        let mut parser = Parser::new(boundary);
        let mut media = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        for cut in cuts.into_iter().chain([body.len()]) {
            if let Some(m) = parser.push(&body[at..cut])? {
                media.extend_from_slice(&m);
            }
            at = cut;
        }
        parser.end()?;
        Ok(media)
    }

    /// A body as Google's Python client writes it: bare LF.
    fn python(payload: &[u8], boundary: &str) -> Vec<u8> {
        [
            format!("--{boundary}\nContent-Type: application/json\nMIME-Version: 1.0\n\n{{}}\n--{boundary}\nContent-Type: application/octet-stream\nMIME-Version: 1.0\nContent-Transfer-Encoding: binary\n\n").as_bytes(),
            payload,
            format!("\n--{boundary}--\n").as_bytes(),
        ]
        .concat()
    }

    #[test]
    fn boundaries_as_content_types_declare_them() {
        let b = boundary("multipart/related; boundary=\"===============7330845974216740156==\"");
        assert_eq!(b.as_deref(), Ok("===============7330845974216740156=="));
        assert_eq!(boundary("Multipart/Related;Boundary=abc").as_deref(), Ok("abc"));
        assert!(boundary("application/json").unwrap_err().contains("multipart/related"));
        assert!(boundary("multipart/related").unwrap_err().contains("no boundary"));
        assert!(boundary(&format!("multipart/related; boundary={}", "x".repeat(71))).is_err());
    }

    #[test]
    fn bare_lf_bodies_keep_a_payload_ending_in_cr() {
        for payload in [&b"plain"[..], b"ends in CR\r", b"", b"\r\n\r\n", b"--B inside"] {
            assert_eq!(parse(&python(payload, "B"), "B", &[]).as_deref(), Ok(payload));
        }
    }

    #[test]
    fn crlf_bodies_and_a_lone_media_part() {
        let body = b"preamble\r\n--xyz\r\nContent-Type: application/json\r\n\r\n{\"resourceName\":\"r\"}\r\n--xyz\r\nContent-Type: text/plain\r\n\r\nline one\nline two\r\n--xyz--\r\nepilogue";
        assert_eq!(parse(body, "xyz", &[]).as_deref(), Ok(&b"line one\nline two"[..]));
        let alone = b"--q\nContent-Type: application/octet-stream\n\npayload\n--q--";
        assert_eq!(parse(alone, "q", &[]).as_deref(), Ok(&b"payload"[..]));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let refused = |body: &[u8], needle: &str| {
            let e = parse(body, "B", &[]).unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        refused(b"no delimiter at all", "no delimiter");
        refused(b"--B\nContent-Type: application/json\n\n{}\n--B--\n", "no media part");
        refused(b"--B\n\npayload", "before its closing delimiter");
        refused(b"--B\n\npayload\n--B\n\nmore\n--B--", "a part after its media part");
        refused(b"--B\nContent-Transfer-Encoding: base64\n\ncGF5bG9hZA==\n--B--", "as binary");
        refused(b"--Bx\n\npayload\n--B--", "not followed by a line end");
        let mut long = b"--B\nContent-Type: application/json\n\n".to_vec();
        long.resize(MAX_FRAMING + 10, b' ');
        refused(&long, "KiB besides the media bytes");
    }

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// However the body is cut into frames, the media bytes come out whole.
        #[test]
        fn any_cuts_give_the_same_media(
            payload in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b'B'), any::<u8>()], 0..300),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            // The client picks a boundary its payload does not contain.
            let boundary = "B=-7";
            prop_assume!(memmem::find(&payload, boundary.as_bytes()).is_none());
            prop_assert_eq!(parse(&python(&payload, boundary), boundary, &cuts), Ok(payload));
        }

        /// Any bytes are media, or refused with a message: never a panic.
        #[test]
        fn any_body_is_parsed_or_refused(body in proptest::collection::vec(any::<u8>(), 0..400), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
            let _ = parse(&body, "B", &cuts);
        }
    }
}
