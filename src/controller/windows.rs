//! Maintenance windows (`spec.rollout.windows`): whether one is open now, and when the next
//! opens. Pure, and tested with fixed instants (time zones with daylight saving included).

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::crd::{MaintenanceWindow, Weekday};

/// A window ready to be asked about.
#[derive(Debug, Clone)]
pub struct Window {
    /// Opening days, Monday first.
    days: [bool; 7],
    /// Minutes after local midnight.
    start: i32,
    end: i32,
    tz: TimeZone,
}

/// Where the windows stand at an instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Now {
    /// Open (or no windows: any time).
    #[default]
    Open,
    /// Closed until then (`None`: none opens within a week, which cannot happen with a day set).
    Closed(Option<Timestamp>),
}

/// Minutes after midnight of `HH:MM` (`24:00` included).
fn minutes(hhmm: &str, what: &str, i: usize) -> Result<i32, String> {
    let bad = || format!("spec.rollout.windows[{i}].{what}: {hhmm:?} is not HH:MM");
    let two =
        |s: &str| (s.len() == 2 && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse::<i32>().ok()).flatten();
    let (h, m) = hhmm.split_once(':').and_then(|(h, m)| Some((two(h)?, two(m)?))).ok_or_else(bad)?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Read the resource's windows; an error names the field.
pub fn parse(windows: &[MaintenanceWindow]) -> Result<Vec<Window>, String> {
    windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let tz = TimeZone::get(&w.time_zone).map_err(|_| {
                format!("spec.rollout.windows[{i}].timeZone: {:?} is not an IANA time zone", w.time_zone)
            })?;
            if w.days.is_empty() {
                return Err(format!("spec.rollout.windows[{i}].days: give at least one day"));
            }
            let mut days = [false; 7];
            for d in &w.days {
                days[day_index(*d)] = true;
            }
            let (start, end) = (minutes(&w.start, "start", i)?, minutes(&w.end, "end", i)?);
            if start >= 24 * 60 {
                return Err(format!("spec.rollout.windows[{i}].start: 24:00 is the end of a day, not a start"));
            }
            Ok(Window { days, start, end, tz })
        })
        .collect()
}

fn day_index(d: Weekday) -> usize {
    match d {
        Weekday::Mon => 0,
        Weekday::Tue => 1,
        Weekday::Wed => 2,
        Weekday::Thu => 3,
        Weekday::Fri => 4,
        Weekday::Sat => 5,
        Weekday::Sun => 6,
    }
}

/// The instant a local date and minute of the day is in `tz` (a time skipped by a daylight
/// saving change moves forward by the change, 02:30 becoming 03:30; one that happens twice is
/// the first: jiff's `compatible` rule, as RFC 5545 and Temporal do).
fn instant(tz: &TimeZone, date: Date, minute: i32) -> Option<Timestamp> {
    let day = if minute >= 24 * 60 { date.tomorrow().ok()? } else { date };
    let m = minute % (24 * 60);
    let dt: DateTime = day.at((m / 60) as i8, (m % 60) as i8, 0, 0);
    tz.to_ambiguous_zoned(dt).compatible().ok().map(|z| z.timestamp())
}

/// Whether a window is open at `now`, and else when the next opens.
pub fn at(windows: &[Window], now: Timestamp) -> Now {
    let mut next: Option<Timestamp> = None;
    for w in windows {
        let today = now.to_zoned(w.tz.clone()).date();
        // A window opened yesterday may still be open; look a week ahead for the next.
        for offset in -1i64..=7 {
            let Ok(date) = today.checked_add(offset.days()) else { continue };
            if !w.days[date.weekday().to_monday_zero_offset() as usize] {
                continue;
            }
            let end_minute = if w.end <= w.start { w.end + 24 * 60 } else { w.end };
            let (Some(open), Some(close)) = (instant(&w.tz, date, w.start), instant(&w.tz, date, end_minute)) else {
                continue;
            };
            if open <= now && now < close {
                return Now::Open;
            }
            if open > now && next.is_none_or(|n| open < n) {
                next = Some(open);
            }
        }
    }
    Now::Closed(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[Weekday], start: &str, end: &str, tz: &str) -> Vec<Window> {
        parse(&[MaintenanceWindow { days: days.to_vec(), start: start.into(), end: end.into(), time_zone: tz.into() }])
            .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn open_inside_closed_outside_with_the_next_start() {
        use Weekday::*;
        let w = window(&[Mon, Tue, Wed, Thu, Fri], "01:00", "05:00", "Europe/Berlin");
        // Tuesday 2026-12-01, 02:00 in Berlin (UTC+1) is 01:00Z.
        assert_eq!(at(&w, ts("2026-12-01T01:00:00Z")), Now::Open);
        assert_eq!(at(&w, ts("2026-12-01T03:59:59Z")), Now::Open);
        assert_eq!(at(&w, ts("2026-12-01T04:00:00Z")), Now::Closed(Some(ts("2026-12-02T00:00:00Z"))));
        // Friday after the window: the next opens on Monday.
        assert_eq!(at(&w, ts("2026-12-04T12:00:00Z")), Now::Closed(Some(ts("2026-12-07T00:00:00Z"))));
    }

    #[test]
    fn a_window_across_midnight_and_daylight_saving() {
        use Weekday::*;
        let w = window(&[Sat], "22:00", "02:00", "Europe/Berlin");
        // Saturday 2026-12-05 23:30 Berlin = 22:30Z; Sunday 01:30 Berlin = 00:30Z: still open.
        assert_eq!(at(&w, ts("2026-12-05T22:30:00Z")), Now::Open);
        assert_eq!(at(&w, ts("2026-12-06T00:30:00Z")), Now::Open);
        assert_eq!(at(&w, ts("2026-12-06T01:00:00Z")), Now::Closed(Some(ts("2026-12-12T21:00:00Z"))));
        // Summer time (UTC+2): the same local window is an hour earlier in UTC.
        assert_eq!(at(&w, ts("2026-07-04T20:30:00Z")), Now::Open);
        let all = window(&[Mon, Tue, Wed, Thu, Fri, Sat, Sun], "00:00", "24:00", "UTC");
        assert_eq!(at(&all, ts("2026-12-06T13:00:00Z")), Now::Open);
    }

    #[test]
    fn bad_windows_name_their_field() {
        let bad = |tz: &str, start: &str, end: &str| {
            parse(&[MaintenanceWindow {
                days: vec![Weekday::Mon],
                start: start.into(),
                end: end.into(),
                time_zone: tz.into(),
            }])
            .unwrap_err()
        };
        assert!(bad("Mars/Olympus", "01:00", "02:00").contains("windows[0].timeZone"));
        assert!(bad("UTC", "1:0x", "02:00").contains("windows[0].start"));
        assert!(bad("UTC", "01:00", "24:30").contains("windows[0].end"));
        assert!(bad("UTC", "24:00", "02:00").contains("not a start"));
    }
}
