//! The pieces of a self-contained HTML page: escaping, sortable tables, inline and relative
//! images. Nothing here reaches the network: styles and script are inlined and the
//! Content-Security-Policy forbids any other origin, so a page that tried would fail loudly in
//! the browser test rather than silently in a hospital without internet access.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;

const CSS: &str = include_str!("report.css");
const JS: &str = include_str!("report.js");

/// Text made safe for HTML text and quoted attributes (`& < > " ' /`).
pub fn esc(s: &str) -> String {
    html_escape::encode_safe(s).into_owned()
}

/// A relative link to a file beside the page: each component's OS bytes percent-encoded, so
/// spaces, `#`, `?`, quotes and names that are not UTF-8 reach the right file.
pub fn href(rel: &Path) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    rel.components()
        .map(|c| percent_encode(c.as_os_str().as_encoded_bytes(), KEEP).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

pub fn png_data_uri(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// One table cell: its text and, for numeric columns, the value it sorts by.
pub struct Cell {
    pub text: String,
    pub num: Option<f64>,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell { text: s.into(), num: None }
    }

    /// A number shown with 4 decimals (NaN as "–", sorted last).
    pub fn num(v: f64) -> Cell {
        Cell { text: if v.is_finite() { format!("{v:.4}") } else { "–".into() }, num: Some(v) }
    }

    /// A number shown as given and sorted by `v`.
    pub fn shown(text: impl Into<String>, v: f64) -> Cell {
        Cell { text: text.into(), num: Some(v) }
    }
}

/// A table sorted by clicking a header (report.js): numeric columns by value, others as text.
pub fn table(id: &str, headers: &[String], rows: &[Vec<Cell>]) -> String {
    let numeric: Vec<bool> = (0..headers.len())
        .map(|c| !rows.is_empty() && rows.iter().all(|r| r.get(c).is_some_and(|x| x.num.is_some())))
        .collect();
    let mut s = format!("<table class=\"sortable\" id=\"{}\">\n<thead><tr>", esc(id));
    for (h, &n) in headers.iter().zip(&numeric) {
        let kind = if n { "num" } else { "text" };
        write!(s, "<th data-type=\"{kind}\" tabindex=\"0\" aria-sort=\"none\">{}</th>", esc(h)).unwrap();
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for r in rows {
        s.push_str("<tr>");
        for (c, cell) in r.iter().enumerate() {
            match cell.num.filter(|_| numeric[c]) {
                // NaN sorts last whichever way: the script reads an empty value as missing.
                Some(v) if v.is_finite() => write!(s, "<td class=\"n\" data-v=\"{v:e}\">{}</td>", esc(&cell.text)),
                Some(_) => write!(s, "<td class=\"n\" data-v=\"\">{}</td>", esc(&cell.text)),
                None => write!(s, "<td>{}</td>", esc(&cell.text)),
            }
            .unwrap();
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");
    s
}

/// A whole page around `body` (already HTML).
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data: file: 'self'; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>\n{CSS}</style></head>\n<body>\n<h1>{}</h1>\n{body}\n<script>\n{JS}</script>\n\
         </body></html>\n",
        esc(title),
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_strings_cannot_open_tags_or_leave_attributes() {
        let name = "x<img src=x onerror=alert(1)>&\"'";
        assert_eq!(esc(name), "x&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;");
        let t = table("t", &["image".into()], &[vec![Cell::text(name)]]);
        assert!(!t.contains("<img") && t.contains("&lt;img"), "{t}");
    }

    #[test]
    fn links_encode_every_byte_that_is_not_plain() {
        assert_eq!(href(Path::new("overlays/a b#1?.png")), "overlays/a%20b%231%3F.png");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let p = Path::new(std::ffi::OsStr::from_bytes(b"o/\xff\"<.png"));
            assert_eq!(href(p), "o/%FF%22%3C.png");
        }
    }

    #[test]
    fn a_column_is_numeric_only_when_every_cell_is() {
        let rows = vec![
            vec![Cell::text("a"), Cell::num(0.5), Cell::num(f64::NAN)],
            vec![Cell::text("b"), Cell::num(0.25), Cell::text("x")],
        ];
        let t = table("t", &["image".into(), "dice".into(), "hd95".into()], &rows);
        assert_eq!(t.matches("data-type=\"num\"").count(), 1, "{t}");
        assert!(t.contains("data-v=\"5e-1\">0.5000<"), "{t}");
    }
}
