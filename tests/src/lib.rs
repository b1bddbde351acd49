//! Cross-component scenarios: the examples against the resource types and the generated
//! CRDs now; worker, operator and real services together as they land.
