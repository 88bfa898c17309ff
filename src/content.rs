//! Message content: a string, or a list of blocks — `{type: "text", text}`
//! and `{type: "image", source: {type: "base64", media_type, data}}`.
//!
//! Checked once, when the message is posted, so the child never gets what
//! the model API would refuse later (an unknown media type, bytes that are
//! not the image they claim to be, an image above the size limit).

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;

/// Image media types the Messages API takes.
pub const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// A message's content as posted (and as `Message.input` shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Checked blocks, kept as the client sent them.
    Blocks(Vec<Value>),
}

impl Content {
    /// Whether any block is an image.
    pub fn has_images(&self) -> bool {
        match self {
            Content::Text(_) => false,
            Content::Blocks(blocks) => blocks.iter().any(|b| b["type"] == "image"),
        }
    }

    /// The text of the content: the string, or the text blocks joined by
    /// newlines (for agents that take text only; images are refused earlier).
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Blocks(blocks) => blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The content as the Messages API writes it: a string or a list of blocks.
    pub fn to_json(&self) -> Value {
        match self {
            Content::Text(s) => json!(s),
            Content::Blocks(blocks) => Value::Array(blocks.clone()),
        }
    }
}

/// Checks posted `content`; images decoded larger than `max_image` bytes are
/// a 413, anything malformed a 400 naming the block.
pub fn parse(content: Value, max_image: usize) -> Result<Content, ApiError> {
    let blocks = match content {
        Value::String(s) => return Ok(Content::Text(s)),
        Value::Array(blocks) => blocks,
        other => {
            return Err(ApiError::BadRequest(format!(
                "content must be a string or a list of blocks, not {}",
                kind_of(&other)
            )))
        }
    };
    if blocks.is_empty() {
        return Err(ApiError::BadRequest(
            "content must hold at least one block".into(),
        ));
    }
    for (i, block) in blocks.iter().enumerate() {
        check_block(i, block, max_image)?;
    }
    Ok(Content::Blocks(blocks))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Keys of `v` other than `allowed`, as a 400 (unknown fields are refused everywhere).
fn only_keys(v: &Value, allowed: &[&str], what: &str) -> Result<(), ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::BadRequest(format!("{what} must be an object")))?;
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::BadRequest(format!(
            "{what}: unknown field {k:?} (known: {})",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn check_block(i: usize, block: &Value, max_image: usize) -> Result<(), ApiError> {
    let what = format!("content[{i}]");
    let bad = |m: String| ApiError::BadRequest(format!("{what}: {m}"));
    match block.get("type").and_then(Value::as_str) {
        Some("text") => {
            only_keys(block, &["type", "text"], &what)?;
            if !block["text"].is_string() {
                return Err(bad("a text block needs a string `text`".into()));
            }
            Ok(())
        }
        Some("image") => {
            only_keys(block, &["type", "source"], &what)?;
            let source = &block["source"];
            only_keys(
                source,
                &["type", "media_type", "data"],
                &format!("{what}.source"),
            )?;
            if source["type"] != "base64" {
                return Err(bad("image source type must be \"base64\"".into()));
            }
            let media_type = source["media_type"].as_str().unwrap_or("");
            if !IMAGE_TYPES.contains(&media_type) {
                return Err(bad(format!(
                    "media_type {media_type:?} is not one of {}",
                    IMAGE_TYPES.join(", ")
                )));
            }
            let data = source["data"]
                .as_str()
                .ok_or_else(|| bad("image source needs a base64 string `data`".into()))?;
            // Three bytes per four characters: refuse by length before decoding.
            if data.len() / 4 * 3 > max_image + 3 {
                return Err(too_large(&what, max_image));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| bad(format!("image data is not base64: {e}")))?;
            if bytes.len() > max_image {
                return Err(too_large(&what, max_image));
            }
            if !magic_matches(media_type, &bytes) {
                return Err(bad(format!("image data is not a {media_type} image")));
            }
            Ok(())
        }
        Some(other) => Err(bad(format!(
            "unknown block type {other:?} (known: text, image)"
        ))),
        None => Err(bad("a block needs a `type`".into())),
    }
}

fn too_large(what: &str, max: usize) -> ApiError {
    ApiError::ContentTooLarge(format!(
        "{what}: the image is larger than {max} bytes (--max-image-bytes)"
    ))
}

/// Whether `bytes` start the way a `media_type` file does; the model API
/// refuses an image whose bytes and declared type disagree.
fn magic_matches(media_type: &str, bytes: &[u8]) -> bool {
    match media_type {
        "image/png" => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => bytes.starts_with(b"\xff\xd8\xff"),
        "image/gif" => bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a"),
        "image/webp" => bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png() -> String {
        base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nrest-of-png")
    }

    fn image(media_type: &str, data: &str) -> Value {
        json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
    }

    #[test]
    fn strings_and_blocks() {
        assert_eq!(parse(json!("hi"), 10).unwrap(), Content::Text("hi".into()));
        let c = parse(
            json!([{"type": "text", "text": "look"}, image("image/png", &png())]),
            1000,
        )
        .unwrap();
        assert!(c.has_images());
        assert_eq!(c.text(), "look");
    }

    #[test]
    fn bad_blocks_are_400_and_big_images_413() {
        let status = |v: Value, max| parse(v, max).unwrap_err().status().as_u16();
        assert_eq!(status(json!(3), 10), 400);
        assert_eq!(status(json!([]), 10), 400);
        assert_eq!(status(json!([{"type": "video"}]), 10), 400);
        assert_eq!(status(json!([{"type": "text", "text": 1}]), 10), 400);
        assert_eq!(
            status(json!([{"type": "text", "text": "a", "x": 1}]), 10),
            400
        );
        assert_eq!(status(json!([image("image/bmp", &png())]), 1000), 400);
        assert_eq!(status(json!([image("image/jpeg", &png())]), 1000), 400);
        assert_eq!(status(json!([image("image/png", "!!!")]), 1000), 400);
        assert_eq!(status(json!([image("image/png", &png())]), 8), 413);
    }
}
