with orders as (
    select customer_id, count(*) as number_of_orders, min(order_date) as first_order
    from {{ ref('stg_orders') }}
    group by customer_id
)
select c.customer_id, c.first_name, c.last_name,
       coalesce(o.number_of_orders, 0) as number_of_orders, o.first_order
from {{ ref('stg_customers') }} c
left join orders o using (customer_id)
