//! Which destinations an event goes to. Pure: topic, tenant and `destination_id` in,
//! destinations out, no I/O.
//!
//! Patterns are compiled into a trie over topic segments, so matching costs about one hash lookup
//! per topic segment (plus the wildcard branches that exist), however many patterns are configured.
//! The router owns what it routes to: the running worker routes to [`crate::destination::Destination`]s,
//! and tests and the fuzzer route to plain configurations.

use std::collections::HashMap;

use crate::config::DestinationConfig;
use crate::event::Event;
use crate::topic::{self, Segment, TopicPattern};

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

/// What the router needs to know of a destination.
pub trait Routable {
    /// The unique name an envelope's `destination_id` refers to.
    fn name(&self) -> &str;
    /// The only tenant it accepts, if it is scoped to one.
    fn tenant(&self) -> Option<&str>;
    /// The patterns of the topics it receives.
    fn topics(&self) -> &[TopicPattern];
}

impl Routable for DestinationConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }
    fn topics(&self) -> &[TopicPattern] {
        &self.topics
    }
}

/// Where an entry stands in the router's own list; its order is the configuration's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot(usize);

#[derive(Default, Debug)]
struct Node {
    /// Literal next segments.
    children: HashMap<Box<str>, Node>,
    /// `*` or `+`: exactly one segment.
    one: Option<Box<Node>>,
    /// `#`: zero or more segments.
    many: Option<Box<Node>>,
    /// Entries whose pattern ends here.
    terminal: Vec<Slot>,
}

/// The compiled routing table over a set of destinations, which it owns.
#[derive(Debug)]
pub struct Router<T> {
    entries: Vec<T>,
    root: Node,
    /// Entries with the lone pattern `*`.
    match_all: Vec<Slot>,
    by_name: HashMap<Box<str>, Slot>,
}

impl<T: Routable> Router<T> {
    /// Compiles every entry's patterns; the entries keep their order.
    pub fn new(entries: Vec<T>) -> Router<T> {
        let mut router = Router {
            root: Node::default(),
            match_all: Vec::new(),
            by_name: HashMap::with_capacity(entries.len()),
            entries: Vec::new(),
        };
        for (i, entry) in entries.iter().enumerate() {
            let slot = Slot(i);
            router.by_name.insert(entry.name().into(), slot);
            for pattern in entry.topics() {
                router.add(pattern, slot);
            }
        }
        router.entries = entries;
        router
    }

    fn add(&mut self, pattern: &TopicPattern, slot: Slot) {
        if pattern.matches_everything() {
            if !self.match_all.contains(&slot) {
                self.match_all.push(slot);
            }
            return;
        }
        let mut node = &mut self.root;
        for segment in pattern.segments() {
            node = match segment {
                Segment::One => node.one.get_or_insert_with(Box::default),
                Segment::Many => node.many.get_or_insert_with(Box::default),
                Segment::Literal(literal) => node.children.entry(literal.clone()).or_default(),
            };
        }
        if !node.terminal.contains(&slot) {
            node.terminal.push(slot);
        }
    }

    /// The destinations `event` goes to, in configuration order, each once. Empty means the event
    /// matched nothing.
    pub fn route(&self, event: &Event) -> Result<Vec<&T>, Unroutable> {
        if let Some(name) = &event.destination_id {
            let entry = self
                .get(name)
                .ok_or_else(|| Unroutable::UnknownDestination(name.clone()))?;
            if let Some(expected) = entry.tenant() {
                if event.tenant_id.as_deref() != Some(expected) {
                    return Err(Unroutable::WrongTenant {
                        destination: name.clone(),
                        expected: expected.to_string(),
                        actual: event.tenant_id.clone(),
                    });
                }
            }
            return Ok(vec![entry]);
        }
        let mut out = self.match_topic(&event.topic);
        out.retain(|entry| match entry.tenant() {
            None => true,
            Some(t) => event.tenant_id.as_deref() == Some(t),
        });
        Ok(out)
    }

    /// Destinations whose patterns match `topic`, ignoring tenants. An empty topic means the event
    /// named none, which (as the event envelope defines it) matches every destination.
    pub fn match_topic(&self, topic: &str) -> Vec<&T> {
        if topic.is_empty() {
            return self.entries.iter().collect();
        }
        let mut segments: Vec<&str> = Vec::with_capacity(8);
        segments.extend(topic::segments(topic));
        let mut slots = self.match_all.clone();
        walk(&self.root, &segments, &mut slots, &mut HashMap::new());
        slots.sort_unstable();
        slots.dedup();
        slots.into_iter().map(|Slot(i)| &self.entries[i]).collect()
    }

    /// The destination called `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.by_name.get(name).map(|&Slot(i)| &self.entries[i])
    }

    /// Every destination, in configuration order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.entries.iter()
    }

    /// How many destinations there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none (never, for a validated config).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
    out: &mut Vec<Slot>,
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

    fn router(dests: &[(&str, &[&str], Option<&str>)]) -> Router<DestinationConfig> {
        let mut text = String::from("[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n");
        for (name, topics, tenant) in dests {
            text.push_str(&format!(
                "[[destinations]]\nname = \"{name}\"\nurl = \"http://127.0.0.1/\"\ntopics = {topics:?}\n"
            ));
            if let Some(t) = tenant {
                text.push_str(&format!("tenant = \"{t}\"\n"));
            }
        }
        Router::new(Config::from_toml(&text).expect("config").destinations)
    }

    /// The names of what matched, in order.
    fn names(matched: Vec<&DestinationConfig>) -> Vec<&str> {
        matched.into_iter().map(|d| d.name.as_str()).collect()
    }

    fn route<'a>(
        r: &'a Router<DestinationConfig>,
        event: &Event,
    ) -> Result<Vec<&'a str>, Unroutable> {
        r.route(event).map(names)
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
            properties: None,
            trace: None,
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
        let m = |topic: &str| names(r.match_topic(topic));
        assert_eq!(m("user.created"), ["all", "exact", "one", "many"]);
        assert_eq!(m("user"), ["all", "many"], "# matches zero segments");
        assert_eq!(
            m("user/x/done"),
            ["all", "plus", "many"],
            "/ and . both split"
        );
        assert_eq!(m("user.a.b.c"), ["all", "many"]);
        assert_eq!(m("other"), ["all"]);
        assert_eq!(m("a.z"), ["all", "mid"]);
        assert_eq!(m("a.b.c.z"), ["all", "mid"]);
        assert_eq!(m("a.b.c"), ["all"]);
        assert_eq!(
            m(""),
            ["all", "exact", "one", "plus", "many", "mid"],
            "no topic matches all"
        );
    }

    #[test]
    fn tenants_and_destination_id() {
        let r = router(&[("a", &["*"], Some("acme")), ("b", &["*"], None)]);
        assert_eq!(
            route(&r, &event("t", Some("acme"), None)),
            Ok(vec!["a", "b"])
        );
        assert_eq!(route(&r, &event("t", Some("other"), None)), Ok(vec!["b"]));
        assert_eq!(route(&r, &event("t", None, None)), Ok(vec!["b"]));
        assert_eq!(route(&r, &event("nomatch", None, Some("b"))), Ok(vec!["b"]));
        assert_eq!(
            route(&r, &event("t", None, Some("zzz"))),
            Err(Unroutable::UnknownDestination("zzz".into()))
        );
        assert!(matches!(
            route(&r, &event("t", Some("other"), Some("a"))),
            Err(Unroutable::WrongTenant { .. })
        ));
        assert_eq!(r.get("b").map(|d| d.name.as_str()), Some("b"));
        assert!(r.get("zzz").is_none());
    }

    #[test]
    fn each_destination_once() {
        let r = router(&[("a", &["x.*", "x.#", "*", "x.y"], None)]);
        assert_eq!(names(r.match_topic("x.y")), ["a"]);
    }

    /// Found by fuzzing (fuzz/regressions/route_topic): every `#` multiplied the work by the
    /// topic's length, so this did not finish within 20 s; it takes milliseconds.
    #[test]
    fn many_hashes_against_a_long_topic() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = router(&[
                ("hashes", &["#.#.#.#.#.#.#.#.z"], None),
                ("twice", &["#.a.#.a.#"], None),
            ]);
            let long = vec!["a"; 2_000].join(".");
            let m = |topic: &str| -> Vec<String> {
                names(r.match_topic(topic))
                    .into_iter()
                    .map(String::from)
                    .collect()
            };
            let _ = tx.send((m(&long), m(&format!("{long}.z")), m("a.z"), m("z")));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("matching took over 20 s");
        assert_eq!(
            got,
            (
                vec!["twice".to_string()],
                vec!["hashes".to_string(), "twice".to_string()],
                vec!["hashes".to_string()],
                vec!["hashes".to_string()]
            )
        );
    }
}
