//! The two line formats Istio's ztunnel writes, so log pipelines built for it parse ours.
//!
//! Text (`LOG_FORMAT=plain`): tab-separated time, lowercase level, scope (the target,
//! without a leading `ztunnel::`, followed by `:span{fields}` per enclosing span), the
//! message, then the fields as `key=value` separated by spaces. Values recorded as strings
//! are quoted (`direction="outbound"`); values logged with `%` (addresses) and numbers are
//! not.
//!
//! JSON (`LOG_FORMAT=json`): one flat object per line: `level`, `time`, `scope` (the full
//! target), `message`, every field under its own name with its JSON type (numbers stay
//! numbers), and each enclosing span's fields as an object under the span's name.

use std::fmt::{self, Write as _};

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Istio's text lines; also formats span fields (`k=v`).
#[derive(Clone, Copy, Debug, Default)]
pub struct IstioText;

/// Istio's JSON lines; span fields are formatted by [`JsonFields`].
#[derive(Clone, Copy, Debug, Default)]
pub struct IstioJson;

/// Span fields as JSON objects, for [`IstioJson`].
pub fn json_fields() -> JsonFields {
    JsonFields::new()
}

/// Writes `message` first (then a tab) and the other fields as `k=v`, space-separated;
/// the `log.*` fields of records bridged from the `log` crate are already in the
/// normalized metadata and are skipped.
struct TextVisitor<'a> {
    out: &'a mut String,
    first: bool,
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value)
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        if name == "message" {
            let _ = write!(self.out, "{value:?}\t");
            return;
        }
        if !std::mem::replace(&mut self.first, false) {
            self.out.push(' ');
        }
        let _ = write!(self.out, "{name}={value:?}");
    }
}

impl<'w> FormatFields<'w> for IstioText {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut out = String::new();
        fields.record(&mut TextVisitor {
            out: &mut out,
            first: true,
        });
        writer.write_str(&out)
    }
}

impl<S, N> FormatEvent<S, N> for IstioText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        SystemTime.format_time(&mut writer)?;
        let level = meta.level().as_str().to_ascii_lowercase();
        let target = meta.target();
        write!(
            writer,
            "\t{level}\t{}",
            target.strip_prefix("ztunnel::").unwrap_or(target)
        )?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, ":{}", span.metadata().name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
            }
        }
        if event.fields().next().is_some() {
            writer.write_char('\t')?;
        }
        let mut out = String::new();
        event.record(&mut TextVisitor {
            out: &mut out,
            first: true,
        });
        writeln!(writer, "{}", out.trim_end_matches('\t'))
    }
}

/// Serializes each field under its name, keeping numbers and booleans typed.
struct JsonVisitor<M: SerializeMap> {
    map: M,
    state: Result<(), M::Error>,
}

impl<M: SerializeMap> JsonVisitor<M> {
    fn entry(&mut self, field: &Field, value: &impl serde::Serialize) {
        if self.state.is_ok() && !field.name().starts_with("log.") {
            self.state = self.map.serialize_entry(field.name(), value);
        }
    }
}

impl<M: SerializeMap> Visit for JsonVisitor<M> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, &value)
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, &value)
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, &value)
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, &value)
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, &value)
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, &format!("{value:?}"))
    }
}

impl<S, N> FormatEvent<S, N> for IstioJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut buf = Vec::new();
        let line = (|| -> Result<(), serde_json::Error> {
            let mut ser = serde_json::Serializer::new(&mut buf);
            let mut map = ser.serialize_map(None)?;
            map.serialize_entry("level", &meta.level().as_str().to_ascii_lowercase())?;
            map.serialize_entry("time", &time)?;
            map.serialize_entry("scope", meta.target())?;
            let mut v = JsonVisitor { map, state: Ok(()) };
            event.record(&mut v);
            v.state?;
            let mut map = v.map;
            if let Some(scope) = ctx.event_scope() {
                for span in scope.from_root() {
                    let ext = span.extensions();
                    if let Some(fields) = ext.get::<FormattedFields<N>>() {
                        let value: serde_json::Value = if fields.is_empty() {
                            serde_json::Value::Object(Default::default())
                        } else {
                            serde_json::from_str(fields)?
                        };
                        map.serialize_entry(span.metadata().name(), &value)?;
                    }
                }
            }
            map.end()
        })();
        line.map_err(|_| fmt::Error)?;
        writeln!(
            writer,
            "{}",
            std::str::from_utf8(&buf).map_err(|_| fmt::Error)?
        )
    }
}
