//! The text-level steps of loading: `${VAR}` expansion in every string value, and the rewording
//! of the `config` crate's errors into the `key.path: problem` form every other error has.

use super::ConfigError;

/// Replaces `${VAR}` and `${VAR:-default}` in every string value, naming the key when a variable
/// is missing so the operator knows which secret to provide.
pub(super) fn expand_env(value: &mut config::Value, path: &mut String) -> Result<(), ConfigError> {
    match &mut value.kind {
        config::ValueKind::String(s) if s.contains("${") => {
            *s = expand_str(s).map_err(|m| ConfigError::invalid(path.clone(), m))?;
        }
        config::ValueKind::Table(table) => {
            for (k, v) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_env(v, path)?;
                path.truncate(len);
            }
        }
        config::ValueKind::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(v, path)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        // `$${` is a literal `${` (a secret may hold one).
        if start > 0 && rest.as_bytes()[start - 1] == b'$' {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${...} reference".to_string())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            // The text is not quoted: a secret that happens to hold `${` would be shown.
            return Err(
                "a ${...} reference does not name a variable (letters, digits and _ \
                        only); write $${ for a literal ${ (its text is not shown: it may be a \
                        secret)"
                    .to_string(),
            );
        }
        // As in the shell, `:-` also replaces a variable that is set but empty.
        match (std::env::var(name), default) {
            (Ok(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => out.push_str(d),
            (Err(_), None) => {
                return Err(format!("environment variable {name} is not set"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An error raised while a value is deserialised, about one of that value's own keys: the
/// checks of a table whose fields serde reads in one piece (an internally tagged enum such as
/// `auth`), which the `config` crate can only place at the table. Its text is
/// `.<key>: <problem>`, and [`shape_message`] appends the key to the table's path.
pub(super) fn keyed(key: &str, problem: impl std::fmt::Display) -> String {
    format!(".{key}: {problem}")
}

/// The `config` crate puts the key last ("... for key `destinations[0]timeout`") and drops the dot
/// after an index; turn that into the `destinations[0].timeout: ...` form every other error has.
pub(super) fn shape_message(e: config::ConfigError) -> String {
    let text = e.to_string();
    if text.starts_with("TOML parse error") {
        return without_excerpt(&text);
    }
    if let Some(at) = text.rfind(" for key `") {
        let key = dotted(text[at + " for key `".len()..].trim_end_matches('`'));
        let problem = &text[..at];
        if let Some((sub, rest)) = problem.strip_prefix('.').and_then(|p| p.split_once(": ")) {
            return format!("{key}.{sub}: {rest}");
        }
        return format!("{key}: {problem}");
    }
    if let Some(rest) = text.strip_prefix("missing configuration field ") {
        return format!(
            "{}: is required but missing",
            dotted(rest.trim_matches('"'))
        );
    }
    text
}

/// The TOML parser's message without the lines of the file it quotes: a line that does not
/// parse may hold a secret written into it (a password whose closing quote is missing), and the
/// message goes to the log when a reload is refused. Line and column still say where.
fn without_excerpt(text: &str) -> String {
    let mut lines = text.lines().filter(|l| !l.trim_start().contains('|'));
    let head = lines.next().unwrap_or_default();
    let rest: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    match rest.is_empty() {
        true => head.to_string(),
        false => format!("{head}: {}", rest.join(" ")),
    }
}

/// `a[0]b` → `a[0].b`.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_and_defaults() {
        std::env::set_var("COURIER_TEST_EXPAND_X", "v1");
        assert_eq!(expand_str("a${COURIER_TEST_EXPAND_X}b").unwrap(), "av1b");
        assert_eq!(expand_str("${COURIER_TEST_NOPE:-d}").unwrap(), "d");
        std::env::set_var("COURIER_TEST_EXPAND_EMPTY", "");
        assert_eq!(expand_str("${COURIER_TEST_EXPAND_EMPTY:-d}").unwrap(), "d");
        assert!(expand_str("${COURIER_TEST_NOPE}")
            .unwrap_err()
            .contains("COURIER_TEST_NOPE is not set"));
        assert!(expand_str("${oops").is_err());
        // `$${` is a literal `${`; a bad reference's text is not shown (it may be a secret).
        assert_eq!(expand_str("q$${Z!x}9").unwrap(), "q${Z!x}9");
        let err = expand_str("q${Z!x}9").unwrap_err();
        assert!(!err.contains("Z!x") && err.contains("$${"), "{err}");
    }

    #[test]
    fn toml_errors_do_not_quote_the_file() {
        let text = "TOML parse error at line 2, column 46\n  |\n2 | url = \"amqp://guest:supersecret@h/%2f\n  |                                              ^\ninvalid basic string, expected `\"`\n";
        assert_eq!(
            without_excerpt(text),
            "TOML parse error at line 2, column 46: invalid basic string, expected `\"`"
        );
    }

    #[test]
    fn keys_are_dotted() {
        assert_eq!(dotted("destinations[0]timeout"), "destinations[0].timeout");
        assert_eq!(dotted("a[1][2]b.c"), "a[1][2].b.c");
    }
}
