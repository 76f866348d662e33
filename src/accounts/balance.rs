//! Choosing an account within a priority tier: least busy (weighted), weighted round robin,
//! fill first, or most headroom. Pure: loads in, an index out.

use crate::config::Strategy;

/// What the strategy sees of one candidate.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub in_flight: u32,
    pub weight: u32,
    /// The share of its quota left (1 with no reading).
    pub headroom: f64,
}

/// The index in `loads` to use. `turn` is a counter that advances with every pick: it rotates
/// round robin, and breaks ties so equal accounts share the work.
pub fn choose(strategy: Strategy, loads: &[Load], turn: u64) -> usize {
    let n = loads.len();
    if n <= 1 {
        return 0;
    }
    match strategy {
        Strategy::FillFirst => 0,
        Strategy::RoundRobin => {
            let total: u64 = loads.iter().map(|l| u64::from(l.weight.max(1))).sum();
            let mut point = turn % total;
            for (i, l) in loads.iter().enumerate() {
                let w = u64::from(l.weight.max(1));
                if point < w {
                    return i;
                }
                point -= w;
            }
            0
        }
        Strategy::LeastBusy => best(loads, turn, |a, b| {
            busyness(a, b).then_with(|| b.headroom.total_cmp(&a.headroom))
        }),
        Strategy::MostHeadroom => best(loads, turn, |a, b| {
            b.headroom
                .total_cmp(&a.headroom)
                .then_with(|| busyness(a, b))
        }),
    }
}

/// Fewest in flight per unit of weight: compares a/wa with b/wb as a*wb with b*wa.
fn busyness(a: &Load, b: &Load) -> std::cmp::Ordering {
    let lhs = u64::from(a.in_flight) * u64::from(b.weight.max(1));
    let rhs = u64::from(b.in_flight) * u64::from(a.weight.max(1));
    lhs.cmp(&rhs)
}

/// The first index `better` ranks lowest, starting at `turn` so that ties rotate.
fn best(loads: &[Load], turn: u64, better: impl Fn(&Load, &Load) -> std::cmp::Ordering) -> usize {
    let n = loads.len();
    let start = (turn % n as u64) as usize;
    let mut best = start;
    for k in 1..n {
        let i = (start + k) % n;
        if better(&loads[i], &loads[best]).is_lt() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(pairs: &[(u32, u32)]) -> Vec<Load> {
        pairs
            .iter()
            .map(|&(in_flight, weight)| Load {
                in_flight,
                weight,
                headroom: 1.0,
            })
            .collect()
    }

    #[test]
    fn least_busy_prefers_fewest_per_weight_and_rotates_ties() {
        assert_eq!(
            choose(Strategy::LeastBusy, &loads(&[(3, 1), (1, 1), (2, 1)]), 0),
            1
        );
        // 4 in flight with weight 4 is less busy than 2 with weight 1.
        assert_eq!(choose(Strategy::LeastBusy, &loads(&[(2, 1), (4, 4)]), 0), 1);
        let idle = loads(&[(0, 1), (0, 1), (0, 1)]);
        let picks: Vec<usize> = (0..3)
            .map(|t| choose(Strategy::LeastBusy, &idle, t))
            .collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    #[test]
    fn least_busy_spreads_a_burst_evenly() {
        let mut l = loads(&[(0, 1), (0, 1), (0, 1), (0, 1)]);
        for turn in 0..100 {
            let i = choose(Strategy::LeastBusy, &l, turn);
            l[i].in_flight += 1;
        }
        assert!(l.iter().all(|x| x.in_flight == 25), "{l:?}");
    }

    #[test]
    fn round_robin_follows_weights() {
        let l = loads(&[(0, 1), (0, 3)]);
        let mut counts = [0; 2];
        for turn in 0..400 {
            counts[choose(Strategy::RoundRobin, &l, turn)] += 1;
        }
        assert_eq!(counts, [100, 300]);
    }

    #[test]
    fn fill_first_takes_the_first() {
        assert_eq!(choose(Strategy::FillFirst, &loads(&[(9, 1), (0, 1)]), 7), 0);
        assert_eq!(choose(Strategy::LeastBusy, &loads(&[]), 7), 0);
    }

    #[test]
    fn headroom_sorts_most_headroom_and_breaks_least_busy_ties() {
        let mut l = loads(&[(0, 1), (0, 1), (3, 1)]);
        l[0].headroom = 0.2;
        l[1].headroom = 0.6;
        l[2].headroom = 0.9;
        assert_eq!(choose(Strategy::MostHeadroom, &l, 0), 2);
        assert_eq!(
            choose(Strategy::LeastBusy, &l, 0),
            1,
            "idle first, then headroom"
        );
        l[2].headroom = 0.6;
        let picks: Vec<usize> = (0..4)
            .map(|t| choose(Strategy::MostHeadroom, &l, t))
            .collect();
        assert!(
            picks.contains(&1) && picks.iter().all(|&i| i != 0),
            "{picks:?}"
        );
        assert!(
            picks.iter().all(|&i| i == 1),
            "equal headroom: the less busy"
        );
    }
}
