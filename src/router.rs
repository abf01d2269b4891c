//! Which destinations an event goes to. Pure: topic, tenant and `destination_id` in, destination
//! indices out, no I/O.
//!
//! Patterns are compiled into a trie over topic segments, so matching costs about one hash lookup
//! per topic segment (plus the wildcard branches that exist), however many patterns are configured.

use std::collections::HashMap;

use crate::config::DestinationConfig;
use crate::event::Event;

/// Why an event cannot be routed at all; it becomes a dead letter with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// The envelope named a destination that is not configured.
    #[error("destination_id {0:?} is not a configured destination")]
    UnknownDestination(String),
    /// The envelope named a destination that is scoped to another tenant.
    #[error("destination_id {destination:?} only accepts tenant {expected:?}, event tenant is {}", actual.as_deref().map(|t| format!("{t:?}")).unwrap_or_else(|| "absent".into()))]
    WrongTenant {
        destination: String,
        expected: String,
        actual: Option<String>,
    },
}

/// Checks one destination pattern; the error text completes `destinations[i].topics[j]: ...`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty pattern; use \"*\" for every topic".to_string());
    }
    for segment in pattern.split(['.', '/']) {
        let wild = segment.contains(['#', '*', '+']);
        if wild && segment.len() != 1 {
            return Err(format!(
                "{pattern:?}: a wildcard must be a whole segment, found {segment:?}"
            ));
        }
    }
    Ok(())
}

#[derive(Default, Debug)]
struct Node {
    /// Literal next segments.
    children: HashMap<Box<str>, Node>,
    /// `*` or `+`: exactly one segment.
    one: Option<Box<Node>>,
    /// `#`: zero or more segments.
    many: Option<Box<Node>>,
    /// Destinations whose pattern ends here.
    terminal: Vec<usize>,
}

/// The compiled routing table.
#[derive(Debug)]
pub struct Router {
    root: Node,
    /// Destinations with the lone pattern `*`.
    match_all: Vec<usize>,
    by_name: HashMap<String, usize>,
    tenants: Vec<Option<String>>,
    names: Vec<String>,
}

impl Router {
    /// Compiles every destination's patterns. Patterns were validated with the config.
    pub fn new(destinations: &[DestinationConfig]) -> Router {
        let mut router = Router {
            root: Node::default(),
            match_all: Vec::new(),
            by_name: HashMap::new(),
            tenants: Vec::with_capacity(destinations.len()),
            names: Vec::with_capacity(destinations.len()),
        };
        for (index, dest) in destinations.iter().enumerate() {
            router.by_name.insert(dest.name.clone(), index);
            router.tenants.push(dest.tenant.clone());
            router.names.push(dest.name.clone());
            for pattern in &dest.topics {
                router.add(pattern, index);
            }
        }
        router
    }

    fn add(&mut self, pattern: &str, index: usize) {
        if pattern == "*" {
            if !self.match_all.contains(&index) {
                self.match_all.push(index);
            }
            return;
        }
        let mut node = &mut self.root;
        for segment in pattern.split(['.', '/']) {
            node = match segment {
                "*" | "+" => node.one.get_or_insert_with(Box::default),
                "#" => node.many.get_or_insert_with(Box::default),
                literal => node.children.entry(literal.into()).or_default(),
            };
        }
        if !node.terminal.contains(&index) {
            node.terminal.push(index);
        }
    }

    /// The destinations `event` goes to, in configuration order, each once. Empty means the event
    /// matched nothing.
    pub fn route(&self, event: &Event) -> Result<Vec<usize>, Unroutable> {
        if let Some(name) = &event.destination_id {
            let index = *self
                .by_name
                .get(name)
                .ok_or_else(|| Unroutable::UnknownDestination(name.clone()))?;
            if let Some(expected) = &self.tenants[index] {
                if event.tenant_id.as_ref() != Some(expected) {
                    return Err(Unroutable::WrongTenant {
                        destination: name.clone(),
                        expected: expected.clone(),
                        actual: event.tenant_id.clone(),
                    });
                }
            }
            return Ok(vec![index]);
        }
        let mut out = self.match_topic(&event.topic);
        out.retain(|&i| match &self.tenants[i] {
            None => true,
            Some(t) => event.tenant_id.as_ref() == Some(t),
        });
        Ok(out)
    }

    /// Destinations whose patterns match `topic`, ignoring tenants. An empty topic means the event
    /// named none, which (as in seed 002) matches every destination.
    pub fn match_topic(&self, topic: &str) -> Vec<usize> {
        if topic.is_empty() {
            return (0..self.tenants.len()).collect();
        }
        let mut segments: Vec<&str> = Vec::with_capacity(8);
        segments.extend(topic.split(['.', '/']));
        let mut out = self.match_all.clone();
        walk(&self.root, &segments, &mut out, &mut HashMap::new());
        out.sort_unstable();
        out.dedup();
        out
    }

    /// How many destinations there are.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none (never, for a validated config).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The configured name of destination `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }
}

/// `covered` holds, for each `#` node walked so far, the largest number of remaining segments it
/// was walked with: it has been walked with every smaller number too, since `#` can take any of
/// them. So each node is walked at most once per topic position. Without it, each `#` of a
/// pattern multiplied the work by the topic's length: `#.#.#.#.#.#.z` against a topic of about
/// a hundred segments took over 10 s (found by fuzzing).
fn walk(
    node: &Node,
    segments: &[&str],
    out: &mut Vec<usize>,
    covered: &mut HashMap<*const Node, usize>,
) {
    if let Some(many) = &node.many {
        let key: *const Node = &**many;
        let total = segments.len();
        let from = match covered.get(&key) {
            Some(&done) if done >= total => None,
            Some(&done) => Some(done + 1),
            None => Some(0),
        };
        if let Some(from) = from {
            covered.insert(key, total);
            for remaining in from..=total {
                walk(many, &segments[total - remaining..], out, covered);
            }
        }
    }
    match segments.split_first() {
        None => out.extend_from_slice(&node.terminal),
        Some((first, rest)) => {
            if let Some(child) = node.children.get(*first) {
                walk(child, rest, out, covered);
            }
            if let Some(one) = &node.one {
                walk(one, rest, out, covered);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(dests: &[(&str, &[&str], Option<&str>)]) -> Router {
        let mut text = String::from("[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n");
        for (name, topics, tenant) in dests {
            text.push_str(&format!(
                "[[destinations]]\nname = \"{name}\"\nurl = \"http://127.0.0.1/\"\ntopics = {topics:?}\n"
            ));
            if let Some(t) = tenant {
                text.push_str(&format!("tenant = \"{t}\"\n"));
            }
        }
        Router::new(&Config::from_toml(&text).expect("config").destinations)
    }

    fn event(topic: &str, tenant: Option<&str>, dest: Option<&str>) -> Event {
        Event {
            id: "e".into(),
            topic: topic.into(),
            tenant_id: tenant.map(Into::into),
            destination_id: dest.map(Into::into),
            eligible_for_retry: true,
            time: None,
            metadata: Default::default(),
            body: bytes::Bytes::from_static(b"{}"),
            received_at: std::time::SystemTime::UNIX_EPOCH,
            source: crate::event::SourceKind::Rabbitmq,
        }
    }

    #[test]
    fn wildcards() {
        let r = router(&[
            ("all", &["*"], None),
            ("exact", &["user.created"], None),
            ("one", &["user.*"], None),
            ("plus", &["user/+/done"], None),
            ("many", &["user.#"], None),
            ("mid", &["a.#.z"], None),
        ]);
        assert_eq!(r.match_topic("user.created"), vec![0, 1, 2, 4]);
        assert_eq!(r.match_topic("user"), vec![0, 4], "# matches zero segments");
        assert_eq!(
            r.match_topic("user/x/done"),
            vec![0, 3, 4],
            "/ and . both split"
        );
        assert_eq!(r.match_topic("user.a.b.c"), vec![0, 4]);
        assert_eq!(r.match_topic("other"), vec![0]);
        assert_eq!(r.match_topic("a.z"), vec![0, 5]);
        assert_eq!(r.match_topic("a.b.c.z"), vec![0, 5]);
        assert_eq!(r.match_topic("a.b.c"), vec![0]);
        assert_eq!(
            r.match_topic(""),
            vec![0, 1, 2, 3, 4, 5],
            "no topic matches all"
        );
    }

    #[test]
    fn tenants_and_destination_id() {
        let r = router(&[("a", &["*"], Some("acme")), ("b", &["*"], None)]);
        assert_eq!(r.route(&event("t", Some("acme"), None)), Ok(vec![0, 1]));
        assert_eq!(r.route(&event("t", Some("other"), None)), Ok(vec![1]));
        assert_eq!(r.route(&event("t", None, None)), Ok(vec![1]));
        assert_eq!(r.route(&event("nomatch", None, Some("b"))), Ok(vec![1]));
        assert_eq!(
            r.route(&event("t", None, Some("zzz"))),
            Err(Unroutable::UnknownDestination("zzz".into()))
        );
        assert!(matches!(
            r.route(&event("t", Some("other"), Some("a"))),
            Err(Unroutable::WrongTenant { .. })
        ));
    }

    #[test]
    fn each_destination_once() {
        let r = router(&[("a", &["x.*", "x.#", "*", "x.y"], None)]);
        assert_eq!(r.match_topic("x.y"), vec![0]);
    }

    /// Found by fuzzing (fuzz/regressions/route_topic): every `#` multiplied the work by the
    /// topic's length, so this did not finish within 20 s; now it takes milliseconds.
    #[test]
    fn many_hashes_against_a_long_topic() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = router(&[
                ("hashes", &["#.#.#.#.#.#.#.#.z"], None),
                ("twice", &["#.a.#.a.#"], None),
            ]);
            let long = vec!["a"; 2_000].join(".");
            let _ = tx.send((
                r.match_topic(&long),
                r.match_topic(&format!("{long}.z")),
                r.match_topic("a.z"),
                r.match_topic("z"),
            ));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("matching took over 20 s");
        assert_eq!(got, (vec![1], vec![0, 1], vec![0], vec![0]));
    }

    #[test]
    fn bad_patterns() {
        assert!(check_pattern("").is_err());
        assert!(check_pattern("a.b*").is_err());
        assert!(check_pattern("a.#x").is_err());
        assert!(check_pattern("a.#.b/+/*").is_ok());
    }
}
