//! Bad configurations fail before courier connects anywhere, with a message that names the key.

use courier::Config;

const SOURCE: &str = r#"
[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "q"
"#;

fn err(text: &str) -> String {
    match Config::from_toml(text) {
        Ok(_) => panic!("config should be rejected:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// An `[mqtt]` section with `keys` added, and one destination.
fn with_mqtt(keys: &str) -> String {
    format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1\"\nclient_id = \"c\"\ntopics = [\"t\"]\n{keys}\n\n\
         [[destinations]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/x\"\n"
    )
}

fn with_dest(dest: &str) -> String {
    format!("{SOURCE}\n[[destinations]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/x\"\n{dest}\n")
}

#[test]
fn unknown_keys_are_named() {
    let e = err(&format!("{SOURCE}\n[service]\nmax_inflight = 3\n"));
    assert!(e.contains("max_inflight") && e.contains("service"), "{e}");
    let e = err(&with_dest("tls_verfy = false"));
    assert!(e.contains("tls_verfy"), "{e}");
    let e = err(&format!("{}\n[bogus]\nx = 1\n", with_dest("")));
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (with_dest("").replace("http://127.0.0.1:1/x", "/relative"), "destinations[0].url", "relative URL without a base"),
        (with_dest("").replace("http://127.0.0.1:1/x", "ftp://h/x"), "destinations[0].url", "not http or https"),
        (with_dest("topics = [\"a.b*\"]"), "destinations[0].topics[0]", "whole segment"),
        (with_dest("topics = []"), "destinations[0].topics", "is empty"),
        (with_dest("headers = { \"X-Request-Id\" = \"x\" }"), "destinations[0].headers.X-Request-Id", "cannot be overridden"),
        (with_dest("headers = { \"bad header\" = \"x\" }"), "destinations[0].headers.bad header", "not a valid HTTP header name"),
        (with_dest("auth = { type = \"api_key\", header = \"Authorization\", key = \"k\" }"), "destinations[0].auth.header", "contract header"),
        (with_dest("auth = { type = \"basic\", username = \"a\", password = \"${COURIER_TEST_UNSET_SECRET}\" }"), "destinations[0].auth.password", "COURIER_TEST_UNSET_SECRET is not set"),
        (with_dest("timeout = \"0s\""), "destinations[0].timeout", "longer than 0s"),
        (with_dest("tenant = \"\""), "destinations[0].tenant", "must not be empty"),
        (format!("{}\n[[destinations]]\nname = \"a\"\nurl = \"http://h/\"\n", with_dest("")), "destinations[1].name", "duplicate destination name"),
        (with_dest("").replace("amqp://guest", "http://guest"), "rabbitmq.url", "not an amqp"),
        (with_dest("").replace("queue = \"q\"", "queue = \"\""), "rabbitmq.queue", "must not be empty"),
        (with_dest("").replace("queue = \"q\"", "queue = \"q\"\nack_hold = \"2s\""), "rabbitmq.ack_hold", "must be at most 1s"),
        (with_dest("").replace("queue = \"q\"", "queue = \"q\"\nack_hold = \"soon\""), "rabbitmq.ack_hold", "soon"),
        (format!("{}\n[service]\nmax_in_flight = 0\n", with_dest("")), "service.max_in_flight", "at least 1"),
        (SOURCE.to_string(), "destinations", "at least one"),
        (with_mqtt("protocol = \"v4\""), "mqtt.protocol", "expected \"v3\" (MQTT 3.1.1) or \"v5\""),
        (with_mqtt("session_expiry = \"1h\""), "mqtt.session_expiry", "add protocol = \"v5\""),
        (with_mqtt("receive_maximum = 10"), "mqtt.receive_maximum", "is an MQTT 5 setting"),
        (with_mqtt("expired = \"deliver\""), "mqtt.expired", "is an MQTT 5 setting"),
        (with_mqtt("protocol = \"v5\"\nclean_session = false"), "mqtt.clean_session", "use session_expiry"),
        (with_mqtt("protocol = \"v5\"\nreceive_maximum = 0"), "mqtt.receive_maximum", "1 to 65535"),
        (with_mqtt("protocol = \"v5\"\nreceive_maximum = 65536"), "mqtt.receive_maximum", "1 to 65535"),
        (with_mqtt("protocol = \"v5\"\nsession_expiry = \"1500ms\""), "mqtt.session_expiry", "whole number of seconds"),
        (with_mqtt("protocol = \"v5\"\nsession_expiry = \"200years\""), "mqtt.session_expiry", "at most 4294967295s"),
        (with_mqtt("protocol = \"v5\"\nexpired = \"drop\""), "mqtt.expired", "expected \"deliver\" or \"dead_letter\""),
        (with_mqtt("protocol = \"v5\"\nkeep_alive = \"2s\""), "mqtt.keep_alive", "at least 5s with protocol = \"v5\""),
        (with_mqtt("protocol = \"v5\"").replace("client_id = \"c\"\n", ""), "mqtt.client_id", "required when session_expiry is over 0s"),
        (with_dest("").replace("[rabbitmq]", "[other]"), "", "other"),
        (with_dest("headers = { \"traceparent\" = \"00-x\" }"), "destinations[0].headers.traceparent", "trace context header"),
        (format!("{}\n[tracing]\notlp_endpoint = \"grpc://c:4317\"\n", with_dest("")), "tracing.otlp_endpoint", "gRPC is not supported"),
        (format!("{}\n[tracing]\notlp_endpoint = \"http://u:pw@c:4318\"\n", with_dest("")), "tracing.otlp_endpoint", "put credentials in tracing.headers"),
        (format!("{}\n[tracing]\notlp_endpoint = \"collector:4318\"\n", with_dest("")), "tracing.otlp_endpoint", "not an http:// or https:// URL"),
        (format!("{}\n[tracing]\nservice_name = \" \"\n", with_dest("")), "tracing.service_name", "must not be empty"),
        (format!("{}\n[tracing]\nheaders = {{ \"api-key\" = \"k\" }}\n", with_dest("")), "tracing.headers", "tracing.otlp_endpoint is not"),
        (format!("{}\n[tracing]\notlp_endpoint = \"http://c:4318\"\nheaders = {{ \"bad header\" = \"k\" }}\n", with_dest("")), "tracing.headers.bad header", "not a valid HTTP header name"),
        (format!("{}\n[tracing]\nsample_ratio = 0.5\n", with_dest("")), "sample_ratio", "tracing"),
    ];
    for (text, key, what) in cases {
        let e = err(&text);
        assert!(
            e.contains(key) && e.contains(what),
            "want {key:?} and {what:?} in: {e}"
        );
    }
}

/// A file with several mistakes is named by one, the same one every time: the first value that
/// does not parse, in file order; then the first broken rule, section by section (the rule
/// docs/configuration.md states).
#[test]
fn several_mistakes_give_the_same_first_one() {
    let dest = |lines: &str| format!("{SOURCE}\n[[destinations]]\nname = \"a\"\n{lines}\n");
    let cases = [
        (
            dest("signing_secret = \"not base64!\"\nurl = \"/relative\"\ntopics = [\"a*\"]"),
            "destinations[0].signing_secret:",
        ),
        (
            dest("topics = [\"a*\"]\nurl = \"/relative\"\nsigning_secret = \"not base64!\""),
            "destinations[0].topics[0]:",
        ),
        (
            dest("url = \"http://h/\"\nheaders = { \"Host\" = \"x\", \"X-Request-Id\" = \"y\", \"bad name\" = \"z\" }"),
            "destinations[0].headers.Host:",
        ),
        (
            format!("[service]\nmax_in_flight = 0\n{}", dest("url = \"/relative\"")),
            "destinations[0].url:",
        ),
        (
            format!("[service]\nmax_in_flight = 0\n{}", dest("url = \"http://h/\"\ntimeout = \"0s\"")),
            "service.max_in_flight:",
        ),
    ];
    for (text, want) in cases {
        for _ in 0..20 {
            let e = err(&text);
            assert!(e.starts_with(want), "want {want:?} first, got: {e}\n{text}");
        }
    }
}

#[test]
fn wrong_types_name_the_key() {
    let e = err(&format!(
        "{}\n[service]\nmax_in_flight = \"many\"\n",
        with_dest("")
    ));
    assert!(e.contains("service.max_in_flight"), "{e}");
    let e = err(&with_dest("timeout = \"soon\""));
    assert!(e.contains("timeout"), "{e}");
    let e = err(&with_dest("auth = { type = \"oauth\" }"));
    assert!(e.contains("oauth"), "{e}");
}

#[test]
fn the_example_config_is_valid() {
    for file in ["config.toml", "docker/config.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(c.rabbitmq.is_some(), "{file}");
        assert!(!c.destinations.is_empty(), "{file}");
    }
}

// ---------------------------------------------------------------------------------------------
// The "Configuration errors" table of docs/configuration.md. Every row is a snippet and the exact
// message it gives; the table cannot go stale, because this test builds every row's configuration
// and compares the messages character for character. The conventions parsed here are the ones
// the page states above the table.

/// Rows the table must have at least, so that a parser that finds nothing cannot pass.
const MIN_DOCUMENTED_ERRORS: usize = 20;

/// One row of the table.
struct DocumentedError {
    /// 1-based line of the row in docs/configuration.md, for failure messages.
    line: usize,
    /// The snippet: one line of TOML per code span of the second cell.
    snippet: Vec<String>,
    /// The exact `ConfigError` text: the code span of the third cell.
    message: String,
}

/// One `[header]` (or the part before the first header) and its lines.
struct Section {
    header: Option<String>,
    lines: Vec<String>,
}

/// The section of the page that starts with `heading` and ends before the next `## ` heading,
/// with the 1-based line number of its first line.
fn doc_section<'a>(doc: &'a str, heading: &str) -> (usize, Vec<&'a str>) {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no {heading:?} heading"));
    let len = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .unwrap_or(lines.len() - start - 1);
    (start + 1, lines[start..=start + len].to_vec())
}

/// Splits a table row into cells at every `|` not escaped as `\|`, then unescapes `\|`.
fn table_cells(row: &str) -> Vec<String> {
    let inner = row.trim();
    let inner = inner.strip_prefix('|').unwrap_or(inner);
    let inner = inner
        .strip_suffix('|')
        .filter(|s| !s.ends_with('\\'))
        .unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                cells.last_mut().expect("one cell").push('|');
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().expect("one cell").push(c),
        }
    }
    cells.iter().map(|c| c.trim().to_string()).collect()
}

/// The contents of the code spans of a cell, as CommonMark reads them: a run of n backticks opens
/// a span that the next run of exactly n backticks closes, and one space is stripped from each
/// end when the content starts and ends with a space. Text outside spans must be blank.
fn code_spans(cell: &str) -> Result<Vec<String>, String> {
    let mut spans = Vec::new();
    let mut rest = cell;
    loop {
        let start = match rest.find('`') {
            Some(i) => i,
            None if rest.trim().is_empty() => return Ok(spans),
            None => return Err(format!("text outside code spans: {rest:?}")),
        };
        if !rest[..start].trim().is_empty() {
            return Err(format!("text outside code spans: {:?}", &rest[..start]));
        }
        let ticks = rest[start..].len() - rest[start..].trim_start_matches('`').len();
        let body = &rest[start + ticks..];
        let mut search = 0;
        let end = loop {
            let Some(i) = body[search..].find('`') else {
                return Err(format!("unclosed code span in {cell:?}"));
            };
            let at = search + i;
            let run = body[at..].len() - body[at..].trim_start_matches('`').len();
            if run == ticks {
                break at;
            }
            search = at + run;
        };
        let mut content = &body[..end];
        if content.len() >= 2
            && content.starts_with(' ')
            && content.ends_with(' ')
            && !content.trim().is_empty()
        {
            content = &content[1..content.len() - 1];
        }
        spans.push(content.to_string());
        rest = &body[end + ticks..];
    }
}

/// The base configuration (the first ```toml block of the section) and the table's rows.
fn documented_errors() -> (String, Vec<DocumentedError>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let doc = std::fs::read_to_string(&path).expect("docs/configuration.md exists");
    let (first_line, section) = doc_section(&doc, "## Configuration errors");
    let open = section
        .iter()
        .position(|l| l.trim_end() == "```toml")
        .expect("a ```toml block with the base configuration in \"Configuration errors\"");
    let close = open
        + 1
        + section[open + 1..]
            .iter()
            .position(|l| l.trim_end() == "```")
            .expect("the base configuration block is closed");
    let base = section[open + 1..close].join("\n");
    let header = close
        + 1
        + section[close + 1..]
            .iter()
            .position(|l| l.starts_with('|'))
            .expect("a table after the base configuration");
    let mut rows = Vec::new();
    for (i, row) in section[header..].iter().enumerate() {
        if !row.starts_with('|') {
            break;
        }
        let line = first_line + header + i;
        let cells = table_cells(row);
        assert_eq!(
            cells.len(),
            3,
            "docs/configuration.md:{line}: want 3 cells: {row}"
        );
        if i == 0 || cells.iter().all(|c| c.chars().all(|c| "-: ".contains(c))) {
            continue; // the header row and the delimiter row
        }
        let snippet = code_spans(&cells[1])
            .unwrap_or_else(|e| panic!("docs/configuration.md:{line}: snippet: {e}"));
        let message = code_spans(&cells[2])
            .unwrap_or_else(|e| panic!("docs/configuration.md:{line}: message: {e}"));
        assert!(
            !snippet.is_empty() && message.len() == 1,
            "docs/configuration.md:{line}: want a snippet of code spans and one code span for the message: {row}"
        );
        rows.push(DocumentedError {
            line,
            snippet,
            message: message[0].clone(),
        });
    }
    (base, rows)
}

/// Splits TOML lines into sections at `[table]` and `[[array]]` header lines.
fn sections<S: AsRef<str>>(lines: &[S]) -> Vec<Section> {
    let mut out = vec![Section {
        header: None,
        lines: Vec::new(),
    }];
    for line in lines {
        let line = line.as_ref().trim();
        if line.starts_with('[') {
            out.push(Section {
                header: Some(line.to_string()),
                lines: Vec::new(),
            });
        } else if !line.is_empty() {
            out.last_mut()
                .expect("one section")
                .lines
                .push(line.to_string());
        }
    }
    out
}

/// The key of a `key = value` line, `None` for a comment.
fn line_key(line: &str) -> Option<&str> {
    if line.starts_with('#') {
        return None;
    }
    line.split_once('=').map(|(k, _)| k.trim())
}

/// Sets `lines` into `section`: a key the section has is replaced, any other key is added,
/// comments are dropped.
fn set_lines(section: &mut Section, lines: &[String], row: usize) {
    for line in lines {
        if line.starts_with('#') {
            continue;
        }
        let key = line_key(line).unwrap_or_else(|| {
            panic!("docs/configuration.md:{row}: want `key = value` or a comment, got {line:?}")
        });
        match section.lines.iter_mut().find(|l| line_key(l) == Some(key)) {
            Some(existing) => *existing = line.clone(),
            None => section.lines.push(line.clone()),
        }
    }
}

/// The configuration of one row, built by the rules stated above the table: keys before any
/// header go into the base's `[[destinations]]` entry, a `[table]` header sets its keys in the
/// base's table of that name (or adds the table), a `[[array]]` header adds an entry, and a
/// `# without [section]` line removes that section of the base.
fn documented_config(base: &str, row: &DocumentedError) -> String {
    let base_lines: Vec<&str> = base.lines().collect();
    let mut file: Vec<Section> = sections(&base_lines)
        .into_iter()
        .filter(|s| s.header.is_some() || !s.lines.is_empty())
        .collect();
    let mut added: Vec<Section> = Vec::new();
    for part in sections(&row.snippet) {
        for line in &part.lines {
            if let Some(removed) = line.strip_prefix("# without ") {
                let before = file.len();
                file.retain(|s| s.header.as_deref() != Some(removed.trim()));
                assert!(
                    file.len() < before,
                    "docs/configuration.md:{}: the base has no {removed} to remove",
                    row.line
                );
            }
        }
        match &part.header {
            None => {
                if part.lines.iter().all(|l| line_key(l).is_none()) {
                    continue;
                }
                let dest = file
                    .iter_mut()
                    .rfind(|s| s.header.as_deref() == Some("[[destinations]]"))
                    .unwrap_or_else(|| {
                        panic!(
                            "docs/configuration.md:{}: keys before any header need the base's [[destinations]]",
                            row.line
                        )
                    });
                set_lines(dest, &part.lines, row.line);
            }
            Some(h) if !h.starts_with("[[") => {
                match file.iter_mut().find(|s| s.header.as_deref() == Some(h)) {
                    Some(existing) => set_lines(existing, &part.lines, row.line),
                    None => added.push(part),
                }
            }
            Some(_) => added.push(part),
        }
    }
    let mut text = String::new();
    for s in file.iter().chain(&added) {
        if let Some(h) = &s.header {
            text.push_str(h);
            text.push('\n');
        }
        for l in &s.lines {
            text.push_str(l);
            text.push('\n');
        }
    }
    text
}

#[test]
fn documented_errors_are_exact() {
    let (base, rows) = documented_errors();
    if let Err(e) = Config::from_toml(&base) {
        panic!("the base configuration of \"Configuration errors\" must be valid, got: {e}");
    }
    assert!(
        rows.len() >= MIN_DOCUMENTED_ERRORS,
        "the \"Configuration errors\" table has {} rows, want at least {MIN_DOCUMENTED_ERRORS}",
        rows.len()
    );
    let mut failures = Vec::new();
    for row in &rows {
        for line in &row.snippet {
            for var in line.split("${").skip(1) {
                let name = var.split(['}', ':']).next().unwrap_or("");
                assert!(
                    std::env::var_os(name).is_none(),
                    "docs/configuration.md:{}: unset {name} to run this test: the row needs it unset",
                    row.line
                );
            }
        }
        let text = documented_config(&base, row);
        match Config::from_toml(&text) {
            Ok(_) => failures.push(format!(
                "docs/configuration.md:{}: accepted, but documented as {:?}\n{text}",
                row.line, row.message
            )),
            Err(e) if e.to_string() != row.message => failures.push(format!(
                "docs/configuration.md:{}:\n  documented: {}\n  actual:     {e}\n{text}",
                row.line, row.message
            )),
            Err(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} documented configuration errors differ:\n\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn documented_table_parsing() {
    assert_eq!(
        table_cells(r"| a | `x \| y` | `` m `k` `` |"),
        vec!["a", "`x | y`", "`` m `k` ``"]
    );
    assert_eq!(
        code_spans("`[service]` `max_in_flight = 0`").unwrap(),
        vec!["[service]", "max_in_flight = 0"]
    );
    assert_eq!(
        code_spans("`` unknown field `x`, expected `y` ``").unwrap(),
        vec!["unknown field `x`, expected `y`"]
    );
    assert!(code_spans("`a` and `b`").is_err());
    assert!(code_spans("`a").is_err());
}
