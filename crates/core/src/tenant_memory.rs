//! Per-tenant memory (`tenants.<name>.memory_limit`): the memory all running queries of one
//! tenant hold together is bounded, so one tenant's heavy joins fail with a clear error
//! instead of taking the whole pool (`limits.memory_limit`) from every other tenant.
//!
//! A query of a limited tenant runs with a [`TenantPool`] in front of the engine's pool:
//! every reservation is charged to each tenant involved (the caller's, and the tenant
//! another tier carried for) and then to the shared pool; a refusal by any of them fails
//! the query's allocation the way DataFusion's own limit does (ResourcesExhausted), naming
//! the tenant's limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};

/// What one tenant's running queries hold, against its limit. Lives as long as the tenant.
#[derive(Debug)]
pub struct TenantBudget {
    tenant: String,
    limit: usize,
    used: AtomicUsize,
}

impl TenantBudget {
    pub fn new(tenant: &str, limit: usize) -> Self {
        Self { tenant: tenant.to_string(), limit, used: AtomicUsize::new(0) }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Bytes the tenant's queries hold now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> Result<()> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .map(|_| ())
            .map_err(|used| {
                DataFusionError::ResourcesExhausted(format!(
                    "tenant `{}` would hold {} bytes of query memory with {bytes} more, over tenants.{}.memory_limit ({} bytes)",
                    self.tenant,
                    used.saturating_add(bytes),
                    self.tenant,
                    self.limit
                ))
            })
    }

    fn take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn give_back(&self, bytes: usize) {
        // Never below zero, even if DataFusion shrinks what an earlier pool granted.
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(bytes)));
    }
}

/// The pool a limited tenant's query allocates from: its tenants' budgets, then `shared`.
#[derive(Debug)]
pub struct TenantPool {
    budgets: Vec<Arc<TenantBudget>>,
    shared: Arc<dyn MemoryPool>,
}

impl TenantPool {
    pub fn new(budgets: Vec<Arc<TenantBudget>>, shared: Arc<dyn MemoryPool>) -> Self {
        Self { budgets, shared }
    }
}

impl std::fmt::Display for TenantPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenants: Vec<&str> = self.budgets.iter().map(|b| b.tenant()).collect();
        write!(f, "TenantPool({}) over {}", tenants.join(", "), self.shared)
    }
}

impl MemoryPool for TenantPool {
    fn name(&self) -> &str {
        "tenant"
    }

    fn register(&self, consumer: &datafusion::execution::memory_pool::MemoryConsumer) {
        self.shared.register(consumer)
    }

    fn unregister(&self, consumer: &datafusion::execution::memory_pool::MemoryConsumer) {
        self.shared.unregister(consumer)
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.budgets.iter().for_each(|b| b.take(additional));
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.budgets.iter().for_each(|b| b.give_back(shrink));
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        for (i, budget) in self.budgets.iter().enumerate() {
            if let Err(e) = budget.try_take(additional) {
                self.budgets[..i].iter().for_each(|b| b.give_back(additional));
                return Err(e);
            }
        }
        self.shared.try_grow(reservation, additional).inspect_err(|_| {
            self.budgets.iter().for_each(|b| b.give_back(additional));
        })
    }

    fn reserved(&self) -> usize {
        self.shared.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        let tightest = self.budgets.iter().map(|b| b.limit).min();
        match (tightest, self.shared.memory_limit()) {
            (Some(t), MemoryLimit::Finite(s)) => MemoryLimit::Finite(t.min(s)),
            (Some(t), _) => MemoryLimit::Finite(t),
            (None, shared) => shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryConsumer};

    use super::*;

    #[test]
    fn a_tenant_is_refused_past_its_budget_while_the_shared_pool_has_room() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let budget = Arc::new(TenantBudget::new("shop", 1000));
        let pool: Arc<dyn MemoryPool> = Arc::new(TenantPool::new(vec![Arc::clone(&budget)], Arc::clone(&shared)));
        let first = MemoryConsumer::new("a").register(&pool);
        first.try_grow(600).expect("within the budget");
        let second = MemoryConsumer::new("b").register(&pool);
        let err = second.try_grow(600).expect_err("over the tenant's budget");
        assert!(err.to_string().contains("tenants.shop.memory_limit (1000 bytes)"), "{err}");
        assert_eq!(budget.used(), 600, "a refused reservation takes nothing");
        assert_eq!(shared.reserved(), 600);
        // Another tenant draws on the same shared pool undisturbed.
        let other = Arc::new(TenantBudget::new("analytics", 1 << 20));
        let other_pool: Arc<dyn MemoryPool> = Arc::new(TenantPool::new(vec![other], Arc::clone(&shared)));
        MemoryConsumer::new("c").register(&other_pool).try_grow(4000).expect("another tenant's query runs");
        // Memory comes back when a query lets go of it.
        drop(first);
        assert_eq!(budget.used(), 0);
        second.try_grow(600).expect("room again");
    }

    #[test]
    fn both_tenants_of_a_carried_query_are_charged_and_a_refusal_rolls_back() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let (tier, client) = (Arc::new(TenantBudget::new("tiers", 1 << 20)), Arc::new(TenantBudget::new("shop", 100)));
        let pool: Arc<dyn MemoryPool> =
            Arc::new(TenantPool::new(vec![Arc::clone(&tier), Arc::clone(&client)], Arc::clone(&shared)));
        let reservation = MemoryConsumer::new("join").register(&pool);
        reservation.try_grow(80).expect("within both");
        assert_eq!((tier.used(), client.used()), (80, 80));
        reservation.try_grow(80).expect_err("over the carried tenant's budget");
        assert_eq!((tier.used(), client.used(), shared.reserved()), (80, 80, 80), "nothing half-taken");
    }
}
