variable "name" {
  type        = string
  description = "Cluster name; the delegated zone is <name>.<parent_domain>."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,40}$", var.name))
    error_message = "name must be lowercase letters, digits and '-'."
  }
}

variable "parent_domain" {
  type        = string
  description = "The organization's primary domain, whose zone lives in the main account."

  validation {
    condition     = can(regex("^([a-z0-9-]+\\.)+[a-z]{2,}$", var.parent_domain))
    error_message = "parent_domain must be a domain name such as example.com."
  }
}

variable "parent_zone_id" {
  type        = string
  description = "Route53 ID of the primary zone in the main account."

  validation {
    condition     = can(regex("^[A-Z0-9]{1,32}$", var.parent_zone_id))
    error_message = "parent_zone_id must be a Route53 hosted zone ID such as Z0123456789ABCDEFGHIJ (without /hostedzone/)."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}
