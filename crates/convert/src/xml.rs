//! XML from outside, parsed safely.
//!
//! `roxmltree` with `allow_dtd: false` refuses any document with a DOCTYPE,
//! so neither internal entities (the "billion laughs" bomb) nor external
//! ones (`SYSTEM "file:///etc/passwd"`) are ever expanded; OVF, libvirt,
//! VirtualBox and Hyper-V files never need a DTD. The node limit and the
//! size cap bound memory whatever the document.

use crate::{ConvertError, Result};

/// Largest descriptor accepted (OVF envelopes of real appliances are a few
/// hundred KiB at most).
pub const MAX_XML_BYTES: usize = 8 * 1024 * 1024;

/// Most nodes a descriptor may have.
const MAX_XML_NODES: u32 = 200_000;

/// Parses `text` (the contents of `what`, for messages).
pub fn parse<'a>(text: &'a str, what: &str) -> Result<roxmltree::Document<'a>> {
    if text.len() > MAX_XML_BYTES {
        return Err(ConvertError::refused(format!(
            "{what} is {} bytes, more than the {MAX_XML_BYTES} accepted for a descriptor",
            text.len()
        )));
    }
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
    };
    roxmltree::Document::parse_with_options(text, options).map_err(|error| match error {
        roxmltree::Error::DtdDetected => ConvertError::refused(format!(
            "{what} declares a DTD (<!DOCTYPE …>); entity declarations are not accepted in descriptors"
        )),
        other => ConvertError::invalid(format!("{what} is not well-formed XML: {other}")),
    })
}

/// Reads a descriptor file as UTF-8 text, refusing oversized files before
/// reading them whole.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let metadata = std::fs::metadata(path).map_err(|e| ConvertError::io("cannot read", path, e))?;
    if metadata.len() > MAX_XML_BYTES as u64 {
        return Err(ConvertError::refused(format!(
            "{} is {} bytes, more than the {MAX_XML_BYTES} accepted for a descriptor",
            path.display(),
            metadata.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| ConvertError::io("cannot read", path, e))?;
    decode(bytes).ok_or_else(|| {
        ConvertError::invalid(format!("{} is not UTF-8 or UTF-16 text", path.display()))
    })
}

/// UTF-8 (with or without a BOM), or UTF-16 with its BOM — Hyper-V writes
/// its configuration files as UTF-16LE.
fn decode(bytes: Vec<u8>) -> Option<String> {
    let utf16 = |bytes: &[u8], from: fn([u8; 2]) -> u16| {
        if !bytes.len().is_multiple_of(2) {
            return None;
        }
        let units: Vec<u16> = bytes.chunks_exact(2).map(|c| from([c[0], c[1]])).collect();
        String::from_utf16(&units).ok()
    };
    match bytes.as_slice() {
        [0xff, 0xfe, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xfe, 0xff, rest @ ..] => utf16(rest, u16::from_be_bytes),
        [0xef, 0xbb, 0xbf, rest @ ..] => String::from_utf8(rest.to_vec()).ok(),
        _ => String::from_utf8(bytes).ok(),
    }
}

/// The first child element of `node` with local name `name` (namespaces are
/// ignored: OVF files in the wild mix prefixes freely).
pub fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

/// Every child element of `node` with local name `name`.
pub fn children<'a, 'input: 'a>(
    node: roxmltree::Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'input>> + 'a {
    node.children()
        .filter(move |n| n.is_element() && n.tag_name().name() == name)
}

/// The trimmed text of the first child element named `name`.
pub fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).and_then(|n| n.text()).map(str::trim)
}

/// An attribute by local name, whatever its namespace prefix.
pub fn attr<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_bomb_is_refused_before_expansion() {
        let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Envelope>&lol2;</Envelope>"#;
        let error = parse(bomb, "bomb.ovf").unwrap_err().to_string();
        assert!(error.contains("DTD"), "{error}");
    }

    #[test]
    fn external_entity_is_refused() {
        let xxe = r#"<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain>&x;</domain>"#;
        assert!(matches!(parse(xxe, "d.xml"), Err(ConvertError::Refused(_))));
    }

    #[test]
    fn utf16_with_a_bom_is_read() {
        let text = "<configuration/>";
        let mut bytes = vec![0xff, 0xfe];
        bytes.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
        assert_eq!(decode(bytes).as_deref(), Some(text));
        assert_eq!(decode(vec![0xff, 0xfe, 0x41]), None);
    }

    #[test]
    fn namespaces_are_ignored_by_the_helpers() {
        let doc = parse(r#"<a xmlns:o="urn:x"><o:b o:k="v">t</o:b></a>"#, "t").unwrap();
        let b = child(doc.root_element(), "b").unwrap();
        assert_eq!(attr(b, "k"), Some("v"));
        assert_eq!(child_text(doc.root_element(), "b"), Some("t"));
    }
}
