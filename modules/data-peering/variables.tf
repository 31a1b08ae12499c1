variable "name" {
  type        = string
  description = "Name prefix for the peering connection's tags."
}

variable "vpc_id" {
  type        = string
  description = "The Karrots VPC."
}

variable "vpc_cidr_block" {
  type        = string
  description = "The Karrots VPC range (the default Karrots CIDR), admitted by the warehouse's security group."

  validation {
    condition     = can(cidrhost(var.vpc_cidr_block, 0))
    error_message = "vpc_cidr_block must be an IPv4 CIDR block."
  }
}

variable "route_table_ids" {
  type        = list(string)
  description = "Karrots route tables that get a route to the warehouse."
}

variable "data_account_id" {
  type        = string
  description = "The data-warehouse account."

  validation {
    condition     = can(regex("^[0-9]{12}$", var.data_account_id))
    error_message = "data_account_id must be 12 digits."
  }
}

variable "data_vpc_id" {
  type        = string
  description = "The warehouse's main VPC."
}

variable "data_vpc_cidr_block" {
  type        = string
  description = "The warehouse VPC's range; must not overlap the Karrots VPC."

  validation {
    condition     = can(cidrhost(var.data_vpc_cidr_block, 0))
    error_message = "data_vpc_cidr_block must be an IPv4 CIDR block."
  }
}

variable "data_route_table_ids" {
  type        = list(string)
  description = "Warehouse route tables that get a route back to Karrots."
  default     = []
}

variable "data_security_group_id" {
  type        = string
  description = "The database's security group, which admits the Karrots CIDR."
}

variable "database_port" {
  type        = number
  description = "The database port the Karrots CIDR may reach (5432 Postgres/Aurora, 5439 Redshift)."
  default     = 5432

  validation {
    condition     = var.database_port > 0 && var.database_port < 65536
    error_message = "database_port must be a TCP port."
  }
}

variable "peering_accepted" {
  type        = bool
  description = "Set to true once the peering request was accepted in the data account (a manual step): routes can only point at an active peering connection."
  default     = false
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}
