//! The built-in `demo` agent (`agentgate demo-agent`): a real child process
//! that needs nothing installed, so the gateway can be tried on a fresh
//! machine and tested end to end.
//!
//! It speaks the `lines` protocol: it reads one line, streams a reply word by
//! word (with a small delay, to show streaming), ends it with a marker line,
//! and remembers the conversation ("what did I say first?").

use std::io::{BufRead, Write};
use std::time::Duration;

/// The marker line that ends each reply.
pub const END_MARKER: &str = "\u{1}__AGENTGATE_DEMO_END__";
/// The regex the `demo` profile matches the marker with.
pub const END_MARKER_REGEX: &str = "^\u{1}__AGENTGATE_DEMO_END__$";

/// The reply to `input` given what was said before.
pub fn reply(history: &[String], input: &str) -> String {
    let text = input.trim();
    let lower = text.to_lowercase();
    if lower.contains("first") && (lower.contains("say") || lower.contains("said")) {
        return match history.first() {
            Some(first) => format!("First you said: \"{first}\""),
            None => "You have not said anything before this.".to_string(),
        };
    }
    if lower == "count" || lower.contains("how many") {
        return format!("You have sent {} messages before this one.", history.len());
    }
    format!(
        "Hello! You said \"{text}\". This is message {} of our conversation; ask me \"what did I say first?\"",
        history.len() + 1
    )
}

/// Runs the demo agent on stdin/stdout until stdin closes.
pub fn run(oneshot: bool, delay: Duration) -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    let mut history: Vec<String> = Vec::new();
    if oneshot {
        let mut all = String::new();
        for line in stdin.lock().lines() {
            all.push_str(&line?);
            all.push('\n');
        }
        stream(&mut stdout, &reply(&history, &all), delay)?;
        return writeln!(stdout).and_then(|_| stdout.flush());
    }
    for line in stdin.lock().lines() {
        let line = line?;
        let answer = reply(&history, &line);
        history.push(line.trim().to_string());
        stream(&mut stdout, &answer, delay)?;
        writeln!(stdout)?;
        writeln!(stdout, "{END_MARKER}")?;
        stdout.flush()?;
    }
    Ok(())
}

fn stream(out: &mut impl Write, text: &str, delay: Duration) -> std::io::Result<()> {
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.write_all(b" ")?;
        }
        out.write_all(word.as_bytes())?;
        out.flush()?;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_first_thing_said() {
        let history = vec!["my name is Ada".to_string(), "hi".to_string()];
        assert_eq!(
            reply(&history, "What did I say first?"),
            "First you said: \"my name is Ada\""
        );
        assert!(reply(&[], "hello").contains("message 1"));
    }
}
